"""What the benchmarks share: Tansu plus ``distillery up`` in their own processes on a temp dir.

The bench process never opens chDB (one data path per process): it measures through the API.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int | None) -> float:
    """user+system CPU of a live process (all its threads), from /proc."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def uuid7(ms: int) -> str:
    """A time-ordered UUIDv7, as any producer would mint one (see examples/publish_logs.py)."""
    rand = int.from_bytes(os.urandom(10), "big")
    value = ms << 80 | 0x7 << 76 | (rand >> 68 & 0xFFF) << 64 | 0b10 << 62 | rand & ((1 << 62) - 1)
    return str(uuid.UUID(int=value))


class Http:
    """A keep-alive client on http.client (stdlib; usable in spawned processes), with the bench key."""

    def __init__(self, port: int, key: str | None = None, timeout: float = 30) -> None:
        self.port, self.key, self.timeout = port, key, timeout
        self.conn: http.client.HTTPConnection | None = None

    def request(
        self, method: str, path: str, body: bytes | None = None, content_type: str = "application/json"
    ) -> tuple[int, bytes]:
        headers = {"Content-Type": content_type}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        for attempt in (1, 2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
            try:
                self.conn.request(method, path, body=body, headers=headers)
                response = self.conn.getresponse()
                return response.status, response.read()
            except (OSError, http.client.HTTPException):
                self.conn.close()
                self.conn = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def json(self, method: str, path: str, body: object = None) -> tuple[int, dict]:
        status, raw = self.request(method, path, None if body is None else json.dumps(body).encode())
        try:
            return status, json.loads(raw) if raw else {}
        except ValueError:
            return status, {"raw": raw[:300].decode(errors="replace")}

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


class PlatformStack:
    """Tansu + ``distillery up`` (separate processes) on a temporary data dir; a context manager.

    Without :meth:`start_broker`, ``up`` starts its own Tansu child (its embedded default)."""

    def __init__(self, keep: bool, prefix: str = "distillery-bench-") -> None:
        self.keep = keep
        self.tmp = Path(tempfile.mkdtemp(prefix=prefix))
        self.data_dir = self.tmp / "data"
        self.up_log = self.tmp / "up.log"
        self.tansu = None
        self.up: subprocess.Popen | None = None
        self.port = 0

    def __enter__(self) -> PlatformStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def kafka_url(self) -> str:
        return self.tansu.url

    def start_broker(self) -> None:
        from services.common.kafka import TansuBroker, free_port

        self.data_dir.mkdir(parents=True)
        self.tansu = TansuBroker(free_port(), log_path=self.tmp / "tansu.log")
        self.tansu.start()

    def create_key(self, project: str) -> tuple[str, str]:
        """``distillery keys create`` on the stack's data dir: (project id, key)."""
        env = {k: v for k, v in os.environ.items() if k != "DISTILLERY_KAFKA_URL"}
        env.update(COLUMNS="300", NO_COLOR="1", TERM="dumb")
        command = [
            PYTHON,
            "-m",
            "services.cli",
            "keys",
            "create",
            "--project",
            project,
            "--data-dir",
            str(self.data_dir),
        ]
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        project_id = re.search(r"\((proj_[0-9a-zA-Z]+)\)", done.stdout)
        key = re.search(r"(opk_[A-Za-z0-9_\-]+)", done.stdout)
        if done.returncode or not project_id or not key:
            raise RuntimeError(f"`distillery keys create` failed:\n{done.stdout}\n{done.stderr}")
        return project_id.group(1), key.group(1)

    def start_platform(self, timeout: float = 120, env: dict[str, str] | None = None) -> None:
        """``distillery up`` (on the stack's broker, if started) with ``env`` added, waited for until
        /healthz answers."""
        from services.common.kafka import free_port

        self.port, grpc_port = free_port(), free_port()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        if self.tansu is not None:
            env["DISTILLERY_KAFKA_URL"] = self.tansu.url
        command = [
            PYTHON,
            "-m",
            "services.cli",
            "up",
            "--port",
            str(self.port),
            "--grpc-port",
            str(grpc_port),
            "--data-dir",
            str(self.data_dir),
        ]
        self.up = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdout=open(self.up_log, "wb"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C on the bench does not hit it twice
        )
        health = Http(self.port, timeout=2)
        try:
            self.wait_for(lambda: health.request("GET", "/healthz")[0] == 200, timeout, "healthy")
        finally:
            health.close()

    def wait_for(self, check: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll ``check`` until it is true; fail with the log's tail if ``up`` exits or time runs out."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.up.poll() is not None:
                raise RuntimeError(f"`distillery up` exited with {self.up.returncode}:\n{self.log_tail()}")
            try:
                if check():
                    return
            except (OSError, http.client.HTTPException):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"`distillery up` not {what} after {timeout:.0f}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.up_log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.up and self.up.poll() is None:
            self.up.send_signal(signal.SIGINT)
            try:
                self.up.wait(30)
            except subprocess.TimeoutExpired:
                self.up.kill()
                self.up.wait()
        if self.tansu:
            self.tansu.stop()
        if self.keep:
            print(f"kept {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)
