"""The ``distillery`` command as an operator uses it: ``up``, ``keys create``, Ctrl-C."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from services.cli import app
from services.common.kafka import free_port

KEY_LINE = re.compile(r"API key: (opk_\S+)")
PROJECT_LINE = re.compile(r"project (\S+) \((proj_\w+)\)")


def create_key(data_dir: Path, project: str) -> tuple[str, str]:
    result = CliRunner().invoke(
        app, ["keys", "create", "--project", project, "--data-dir", str(data_dir)], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0, result.output
    return PROJECT_LINE.search(result.output).group(2), KEY_LINE.search(result.output).group(1)


def test_keys_create_stores_only_hashes(tmp_path: Path) -> None:
    project_a, key_1 = create_key(tmp_path, "team-a")
    project_again, key_2 = create_key(tmp_path, "team-a")
    project_b, _ = create_key(tmp_path, "team-b")
    assert project_a == project_again != project_b
    assert key_1 != key_2
    raw = (tmp_path / "catalog.db").read_bytes()
    assert key_1.encode() not in raw and key_2.encode() not in raw
    with sqlite3.connect(tmp_path / "catalog.db") as db:
        assert db.execute("SELECT count(*) FROM api_keys WHERE project_id = ?", (project_a,)).fetchone() == (
            2,
        )


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait_healthy(base: str, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"distillery up exited early:\n{process.stdout.read()}")
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("distillery up did not become healthy")


def _wait_count(client: httpx.Client, expected: int, timeout: float = 30) -> int:
    deadline, count = time.monotonic() + timeout, -1
    while time.monotonic() < deadline:
        count = client.get("/logs/count").json()["count"]
        if count >= expected:
            return count
        time.sleep(0.2)
    return count


@pytest.mark.slow
def test_up_serves_everything_and_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    port, grpc_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILLERY_")}
    env["DISTILLERY_BOOTSTRAP_API_KEY"] = "opk_cli_bootstrap"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.cli",
            "up",
            "--port",
            str(port),
            "--grpc-port",
            str(grpc_port),
            "--data-dir",
            str(tmp_path),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(base, process)
        kafka_port = int(json.loads((tmp_path / "run.json").read_text())["kafka_url"].rsplit(":", 1)[1])
        assert _port_open(grpc_port) and _port_open(kafka_port)
        with httpx.Client(
            base_url=f"{base}/api/v1", headers={"Authorization": "Bearer opk_cli_bootstrap"}
        ) as c:
            body = {
                "requestedAt": 1,
                "receivedAt": 2,
                "statusCode": 200,
                "reqPayload": {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
            }
            assert c.post("/report", json=body).json() == {"status": "ok"}
            assert _wait_count(c, 1) == 1

        # a key minted while the platform runs works at once, and sees only its own project
        _, new_key = create_key(tmp_path, "late-team")
        with httpx.Client(base_url=f"{base}/api/v1", headers={"Authorization": f"Bearer {new_key}"}) as c:
            deadline = time.monotonic() + 20
            while c.get("/logs/count").status_code == 401 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert c.get("/logs/count").json()["count"] == 0
    finally:
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output
    assert "Distillery stopped." in output
    assert not _port_open(port) and not _port_open(kafka_port)  # the Tansu child is gone too
    assert not (tmp_path / "run.json").exists()
    assert "opk_cli_bootstrap" not in output  # secrets never reach the logs


@pytest.mark.slow
def test_demo_runs_the_loop_end_to_end(tmp_path: Path) -> None:
    """`make demo`'s command: capture sample traffic, search it, curate a dataset from it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILLERY_")}
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", "demo", "--logs", "300", "--data-dir", str(tmp_path / "demo")],
        env={**env, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    captured = re.search(r"(\d+) calls captured in", result.stdout)
    assert captured and int(captured.group(1)) >= 290  # a few sample calls are failures, still captured
    assert "Captured request logs" in result.stdout
    searched = re.search(r"(\d+) calls with metadata.prompt_id=text-to-sql-v2", result.stdout)
    assert searched and int(searched.group(1)) > 0  # the metadata search finds what was captured
    assert re.search(r"import from logs\s+│\s+\d+ entries \(\d+ TRAIN / \d+ TEST\)", result.stdout)
    assert "snapshot for training" in result.stdout and "Distillery stopped." in result.stdout
    # It ends by asking the model it trained, once DEPLOYED, and its base one question each.
    assert "one question, two models" in result.stdout, result.stdout[-3000:]
    assert "openpipe:support-triage-tiny" in result.stdout
    assert "openpipe:base/distillery/tiny-chat" in result.stdout
