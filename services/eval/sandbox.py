"""Running untrusted grader code: one locked-down worker process per eval, many rows per process.

Isolation comes from the kernel, not from Python (see ``sandbox_worker``):

- network: the worker starts under ``unshare --net`` (root) or ``unshare --user --map-root-user
  --net --mount`` (an unprivileged user with user namespaces: root inside it, then every
  capability dropped), a network namespace with no interfaces;
  where neither is permitted (a pod without CAP_SYS_ADMIN and without user namespaces) the
  sandbox refuses to run unless ``network="policy"`` says the platform isolates the network
  itself (a Kubernetes NetworkPolicy denying all egress of the eval pods);
- file system: ``chroot`` into a scratch folder of its own (0700), so neither the host's files
  nor another eval's scratch folder exist for it;
- identity: an unprivileged uid per eval (when started as root), no supplementary groups;
- resources: rlimits on CPU time, address space, processes (none: no fork), file size and open
  files; an empty environment (no secrets); a wall-clock timeout per row.

A row whose grader raises, hangs, returns a non-number or a number out of range gets a clear
per-row error; a worker that dies or hangs is killed and restarted for the next rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson

from services.common.children import die_with_parent

log = logging.getLogger(__name__)

WORKER = Path(__file__).with_name("sandbox_worker.py")
UID_BASE = 200_000
UID_RANGE = 60_000
BATCH = 256
GRACE_SECONDS = 2.0


@dataclass(frozen=True)
class Limits:
    row_timeout: float = 5.0
    cpu_seconds: int = 600
    memory_bytes: int = 1024**3
    file_bytes: int = 16 * 1024**2
    open_files: int = 32

    def worker_json(self) -> str:
        return orjson.dumps(
            {
                "cpu_seconds": self.cpu_seconds,
                "memory_bytes": self.memory_bytes,
                "file_bytes": self.file_bytes,
                "open_files": self.open_files,
            }
        ).decode()


@dataclass
class RowResult:
    score: float | None = None
    error: str | None = None
    stdout: str | None = None


class SandboxUnavailable(RuntimeError):
    """This host cannot isolate grader code (and the settings do not accept weaker isolation)."""


def _works(command: list[str]) -> bool:
    try:
        return subprocess.run([*command, "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


_PREFIX: list[str] | None = None
# Without root: a user namespace (root inside, nobody outside) with its own network and mounts
# (a chroot needs a mount namespace owned by the user namespace); the worker drops every capability.
USERNS_PREFIX = ["unshare", "--user", "--map-root-user", "--net", "--mount"]


def network_prefix(network: Literal["namespace", "policy"] = "namespace") -> list[str]:
    """The command that puts the worker in an empty network namespace (probed once)."""
    global _PREFIX
    if _PREFIX is None:
        candidates = [["unshare", "--net"], USERNS_PREFIX]
        _PREFIX = next((c for c in candidates if shutil.which("unshare") and _works(c)), [])
    if _PREFIX:
        return _PREFIX
    if network == "policy":
        return []
    raise SandboxUnavailable(
        "code graders need a network namespace (unshare --net, or user namespaces) and this host "
        "allows neither; grant the eval pod CAP_SYS_ADMIN or user namespaces, or set "
        "DISTILLERY_EVAL_SANDBOX_NETWORK=policy when a NetworkPolicy denies the eval pods all egress"
    )


def sandbox_uid(owner: str) -> int:
    """A stable unprivileged uid per eval (only used when running as root)."""
    digest = int.from_bytes(hashlib.sha256(owner.encode()).digest()[:4], "big")
    return UID_BASE + digest % UID_RANGE


@dataclass
class Sandbox:
    """One eval's grader in its own worker process; ``grade`` many rows, ``close`` when done."""

    source: str
    entry: str = "grader"
    owner: str = "adhoc"
    limits: Limits = field(default_factory=Limits)
    score_range: tuple[float | None, float | None] = (0.0, 1.0)
    network: Literal["namespace", "policy"] = "namespace"
    root: Path | None = None
    restarts: int = 0
    _process: asyncio.subprocess.Process | None = None
    _scratch: Path | None = None
    _load_error: str | None = None
    _started: bool = False

    async def start(self) -> None:
        prefix = network_prefix(self.network)
        uid = sandbox_uid(self.owner) if os.geteuid() == 0 else 0
        if self._scratch is None:
            base = self.root or Path(tempfile.gettempdir()) / "distillery-sandbox"
            base.mkdir(parents=True, exist_ok=True)
            self._scratch = Path(tempfile.mkdtemp(prefix=f"{self.owner[:40]}-", dir=base))
            if uid:
                os.chown(self._scratch, uid, uid)
            self._scratch.chmod(0o700)
        self._process = await asyncio.create_subprocess_exec(
            *prefix,
            sys.executable,
            "-I",
            "-S",
            str(WORKER),
            str(self._scratch),
            str(uid),
            self.limits.worker_json(),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            env={},
            cwd=str(self._scratch),
            start_new_session=True,
            preexec_fn=die_with_parent,  # noqa: PLW1509 (spawned from the event loop's thread)
            limit=16 * 1024 * 1024,
        )
        ready = await self._read(timeout=30)
        if not (ready or {}).get("ready"):
            await self._kill()
            raise SandboxUnavailable("the grader sandbox did not start")
        loaded = await self._ask({"op": "load", "source": self.source, "entry": self.entry}, timeout=30)
        self._started = True
        self._load_error = None if loaded and loaded.get("ok") else (loaded or {}).get("error", "no answer")

    @property
    def scratch(self) -> Path | None:
        return self._scratch

    async def _send(self, message: dict[str, Any]) -> None:
        assert self._process and self._process.stdin
        self._process.stdin.write(orjson.dumps(message) + b"\n")
        await self._process.stdin.drain()

    async def _read(self, *, timeout: float) -> dict[str, Any] | None:
        assert self._process and self._process.stdout
        try:
            line = await asyncio.wait_for(self._process.stdout.readline(), timeout)
        except (TimeoutError, ValueError):
            return None
        return orjson.loads(line) if line else {"eof": True}

    async def _ask(self, message: dict[str, Any], *, timeout: float) -> dict[str, Any] | None:
        try:
            await self._send(message)
        except (BrokenPipeError, ConnectionResetError):
            return None
        return await self._read(timeout=timeout)

    async def _kill(self) -> None:
        if self._process and self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._process.kill()
            await self._process.wait()
        self._process = None

    async def grade(self, rows: list[list[Any]]) -> list[RowResult]:
        """Grade each row's argument list; never raises for what the grader does."""
        results: list[RowResult] = []
        while len(results) < len(rows):
            if self._process is None or self._process.returncode is not None:
                await self._restart()
            if self._load_error is not None:
                return results + [RowResult(error=self._load_error) for _ in rows[len(results) :]]
            batch = rows[len(results) : len(results) + BATCH]
            results += await self._grade_batch(batch)
        return results

    async def _restart(self) -> None:
        if self._started:
            self.restarts += 1
        await self._kill()
        await self.start()

    async def _grade_batch(self, batch: list[list[Any]]) -> list[RowResult]:
        low, high = self.score_range
        message = {"op": "rows", "rows": [{"args": a} for a in batch], "timeout": self.limits.row_timeout}
        try:
            await self._send({**message, "min": low, "max": high})
        except (BrokenPipeError, ConnectionResetError, orjson.JSONEncodeError) as exc:
            await self._kill()
            why = "could not be sent to the grader" if isinstance(exc, orjson.JSONEncodeError) else "died"
            return [RowResult(error=f"the row {why}")]
        results: list[RowResult] = []
        for _ in batch:
            answer = await self._read(timeout=self.limits.row_timeout + GRACE_SECONDS)
            if answer is None or answer.get("eof"):
                # Hung past the in-process alarm, or killed (an rlimit): this row is the culprit.
                crashed = answer is not None
                await self._kill()
                results.append(
                    RowResult(
                        error="the grader process died (resource limit exceeded?)"
                        if crashed
                        else f"the grader timed out after {self.limits.row_timeout:g}s"
                    )
                )
                return results
            results.append(RowResult(answer.get("score"), answer.get("error"), answer.get("stdout")))
        return results

    async def close(self) -> None:
        if self._process and self._process.stdin:
            with contextlib.suppress(Exception):
                self._process.stdin.close()
        await self._kill()
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None

    async def __aenter__(self) -> Sandbox:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
