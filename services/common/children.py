"""Child processes that never outlive the platform: the embedded broker and S3 server.

Each child runs in its own session, so a Ctrl-C in the terminal reaches only the platform,
which stops its children last, after draining. ``PR_SET_PDEATHSIG`` makes the kernel SIGKILL
the child when the thread that spawned it dies, however the platform ends (kill -9 included).
A ``Supervised`` child is spawned and restarted by one long-lived thread, so the thread that
"parents" the child lives exactly as long as the supervision.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
# Loaded here, not in the child: loading a library between fork and exec can deadlock.
_prctl = ctypes.CDLL(None, use_errno=True).prctl


def die_with_parent() -> None:
    """A ``preexec_fn``: the kernel SIGKILLs this child when the thread that spawned it dies
    (use it from a thread that lives as long as the platform, e.g. the event loop's)."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def spawn(
    command: list[str], *, log_path: Path | None, env: dict[str, str], cwd: Path | None = None
) -> subprocess.Popen:
    """Start ``command`` in its own session, SIGKILLed by the kernel if this thread dies."""
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
    try:
        return subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=die_with_parent,  # noqa: PLW1509 (no threads run Python in the child)
        )
    finally:
        if log_path:
            out.close()  # type: ignore[union-attr]


def stop_process(process: subprocess.Popen | None, timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports on 127.0.0.1 (all held open until chosen)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class Supervised:
    """One child process, started by ``launch`` and restarted by a supervisor thread if it dies.

    ``launch`` spawns the process and returns once it serves (raising if it cannot).
    """

    def __init__(self, name: str, launch: Callable[[], subprocess.Popen]) -> None:
        self.name = name
        self._launch = launch
        self.process: subprocess.Popen | None = None
        self._stopping = threading.Event()
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self, timeout: float = 30.0) -> None:
        self._thread = threading.Thread(target=self._supervise, name=f"supervise-{self.name}", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            self.stop()
            raise RuntimeError(f"{self.name} did not start within {timeout}s")
        if self._error is not None:
            self.stop()
            raise RuntimeError(f"{self.name} failed to start: {self._error}") from self._error

    def _supervise(self) -> None:
        try:
            self.process = self._launch()
        except BaseException as exc:  # reported by start()
            self._error = exc
            self._started.set()
            return
        self._started.set()
        while not self._stopping.is_set():
            code = self.process.poll()
            if code is None:
                self._stopping.wait(0.2)
                continue
            log.error("%s exited with code %s; restarting it", self.name, code)
            self.restarts += 1
            try:
                self.process = self._launch()
            except Exception as exc:
                log.error("restarting %s failed: %s; trying again", self.name, exc)
                self._stopping.wait(1.0)
        stop_process(self.process)

    def stop(self) -> None:
        """Stop supervising and terminate the child (from the supervisor thread, its parent)."""
        self._stopping.set()
        if self._thread and self._thread is not threading.current_thread():
            self._thread.join(timeout=15)
        self._thread = None


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    """The environment without the caller's AWS_* variables, plus ``extra``."""
    return {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | extra


def wait_for(check: Callable[[], bool], process: subprocess.Popen, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {process.returncode} while starting")
        if time.monotonic() > deadline:
            stop_process(process)
            raise RuntimeError(f"{what} did not answer within {timeout}s")
        time.sleep(0.02)
