"""Crash-test tools: ``distillery up`` as a child process, a report burst with a signal mid-way,
and the check that every acknowledged report is queryable exactly once."""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from services.common.children import free_ports
from services.common.embedded import read_run_file
from tests.helpers import openai_body

KEY = "opk_crash_test_key"
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Up:
    """One ``distillery up`` process on ``data_dir``."""

    data_dir: Path
    env: dict[str, str]
    port: int = 0
    process: subprocess.Popen | None = None
    started_in: float = 0.0
    run: dict = field(default_factory=dict)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v1"

    def start(self, timeout: float = 90.0) -> Up:
        self.port, grpc_port = free_ports(2)
        command = [sys.executable, "-m", "services.cli", "up", "--port", str(self.port)]
        command += ["--grpc-port", str(grpc_port), "--data-dir", str(self.data_dir)]
        launched = time.monotonic()
        self.process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=self.env,
            stdout=open(self.data_dir.parent / f"{self.data_dir.name}-up.log", "ab"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
        )
        while not self._accepts_reports():
            if self.process.poll() is not None:
                code = self.process.returncode
                raise AssertionError(f"distillery up exited with {code}: {self.log_tail()}")
            if time.monotonic() - launched > timeout:
                raise AssertionError(f"distillery up did not accept /report within {timeout}s")
            time.sleep(0.05)
        self.started_in = time.monotonic() - launched
        self.run = read_run_file(self.data_dir) or {}
        return self

    def _accepts_reports(self) -> bool:
        try:
            response = httpx.post(f"{self.base}/report", json={}, timeout=2)
        except httpx.HTTPError:
            return False
        return response.status_code in (400, 401, 422)

    def log_tail(self, lines: int = 30) -> str:
        path = self.data_dir.parent / f"{self.data_dir.name}-up.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def wait_exit(self, timeout: float = 60.0) -> int:
        assert self.process is not None
        return self.process.wait(timeout=timeout)

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def up_env(**extra: str) -> dict[str, str]:
    """A clean environment for ``distillery up`` with fast consumer groups and short batches."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILLERY_")}
    env.update(
        DISTILLERY_BOOTSTRAP_API_KEY=KEY,
        DISTILLERY_KAFKA_HEARTBEAT_MS="300",
        DISTILLERY_KAFKA_SESSION_TIMEOUT_MS="3000",
        DISTILLERY_LOG_BATCH_MAX_MS="100",
        DISTILLERY_SHUTDOWN_TIMEOUT_SECONDS="10",
        PYTHONUNBUFFERED="1",
        **extra,
    )
    return env


@dataclass
class Burst:
    acked: set[int] = field(default_factory=set)
    refused: collections.Counter = field(default_factory=collections.Counter)
    retry_after: set[str] = field(default_factory=set)


async def burst(
    base: str,
    marker: str,
    n: int,
    *,
    concurrency: int = 16,
    trigger_at: int | None = None,
    trigger: Callable[[], None] | None = None,
) -> Burst:
    """POST ``n`` reports (``completionId`` = ``{marker}-{i}``); once ``trigger_at`` are acknowledged,
    call ``trigger`` (a signal) and keep sending the rest. Nothing is retried."""
    result, queue, fired = Burst(), asyncio.Queue(), False
    for i in range(n):
        queue.put_nowait(i)
    limits = httpx.Limits(max_connections=concurrency)
    headers = {"Authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(base_url=base, headers=headers, limits=limits, timeout=10) as client:

        async def worker() -> None:
            nonlocal fired
            while not queue.empty():
                i = queue.get_nowait()
                body = openai_body(completion_id=f"{marker}-{i}", metadata={"run": marker})
                try:
                    response = await client.post("/report", json=body)
                except httpx.HTTPError as exc:
                    result.refused[type(exc).__name__] += 1
                    continue
                if response.status_code == 200:
                    result.acked.add(i)
                else:
                    result.refused[response.status_code] += 1
                    if "retry-after" in response.headers:
                        result.retry_after.add(response.headers["retry-after"])
                if trigger and not fired and trigger_at is not None and len(result.acked) >= trigger_at:
                    fired = True
                    trigger()

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return result


async def stored(base: str, marker: str, expected: int, timeout: float = 60.0) -> collections.Counter:
    """Wait until at least ``expected`` logs of ``marker`` are queryable (or the timeout), then
    return how many times each report number is stored."""
    headers = {"Authorization": f"Bearer {KEY}"}
    params = {"metadata.run": marker}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30) as client:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            count = (await client.get("/logs/count", params=params)).json()["count"]
            if count >= expected:
                break
            await asyncio.sleep(0.3)
        found: collections.Counter = collections.Counter()
        cursor = None
        while True:
            page_params = {**params, "limit": 1000, **({"cursor": cursor} if cursor else {})}
            page = (await client.get("/logs", params=page_params)).json()
            for log in page["data"]:
                found[int(log["completionId"].rsplit("-", 1)[1])] += 1
            cursor = page.get("next_cursor")
            if not page.get("has_more"):
                return found


def alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead too
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] != "Z"
    except OSError:
        return False


def wait_dead(pids: list[int | None], timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        living = [p for p in pids if alive(p)]
        if not living:
            return []
        time.sleep(0.1)
    return [p for p in pids if p and alive(p)]


def send(pid: int, sig: signal.Signals) -> Callable[[], None]:
    return lambda: os.kill(pid, sig)
