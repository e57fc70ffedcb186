"""The code-grader sandbox: every escape attempt refused by the OS, bad graders give per-row
errors, a killed worker is restarted, and many rows go through one process."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import pytest

from services.eval.sandbox import Limits, Sandbox, network_prefix

ESCAPES = """
import os

def grader(messages, tools, tool_choice, generated_output, dataset_output):
    attempt = generated_output["content"]
    arg = dataset_output.get("content")
    if attempt == "socket":
        import socket
        socket.create_connection(("127.0.0.1", int(arg)), timeout=1)
    elif attempt == "raw_socket":
        __import__("_socket").socket().connect(("127.0.0.1", int(arg)))
    elif attempt == "passwd":
        return len(open("/etc/passwd").read()) and 1.0
    elif attempt == "proc_environ":
        return len(open("/proc/self/environ").read()) and 1.0
    elif attempt == "write_outside":
        open("/tmp/escaped.txt", "w").write("x")
        open("../escaped.txt", "w").write("x")
        return 1.0 if os.path.exists("/tmp/escaped.txt") and os.getcwd() != "/" else 0.5
    elif attempt == "read_other":
        return len(open(arg).read()) and 1.0
    elif attempt == "write_scratch":
        open("mine.txt", "w").write("secret of this eval")
        return 1.0
    elif attempt == "fork_bomb":
        while True:
            os.fork()
    elif attempt == "infinite_loop":
        while True:
            pass
    elif attempt == "stubborn_loop":
        while True:
            try:
                while True:
                    pass
            except BaseException:
                pass
    elif attempt == "allocate_10gb":
        block = bytearray(10 * 1024**3)
        return 1.0 if block else 0.0
    elif attempt == "ctypes":
        import ctypes
        return 1.0
    elif attempt == "secrets":
        found = [k for k, v in os.environ.items() if "sk-" in v or "KEY" in k or "SECRET" in k]
        return 1.0 if found else 0.0
    elif attempt == "exit_process":
        os._exit(1)
    elif attempt == "raise":
        raise ValueError("bad row")
    elif attempt == "string":
        return "1.0"
    elif attempt == "none":
        return None
    elif attempt == "too_big":
        return 1.5
    elif attempt == "nan":
        return float("nan")
    return 0.75
"""


def row(attempt: str, arg: object = None) -> list:
    return [[{"role": "user", "content": "q"}], None, None, {"content": attempt}, {"content": arg}]


@pytest.fixture
async def sandbox(tmp_path, monkeypatch) -> AsyncIterator[Sandbox]:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("OPENAI_API_KEY", "sk-live-secret")
    monkeypatch.setenv("DISTILLERY_SECRET_KEY", "c2VjcmV0")
    box = Sandbox(ESCAPES, owner="eval-a", limits=Limits(row_timeout=1.0), root=tmp_path)
    await box.start()
    yield box
    await box.close()


@pytest.fixture
def listener() -> AsyncIterator[int]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    yield server.getsockname()[1]
    server.close()


async def test_network_is_unreachable(sandbox: Sandbox, listener: int) -> None:
    results = await sandbox.grade([row("socket", listener), row("raw_socket", listener)])
    assert all(r.score is None and r.error for r in results), results
    # The kernel mechanism itself, with the full standard library: the empty namespace has no route.
    probe = await asyncio.to_thread(
        subprocess.run,
        [
            *network_prefix(),
            sys.executable,
            "-c",
            f"import socket; socket.create_connection(('127.0.0.1', {listener}), timeout=1)",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert probe.returncode != 0 and ("Error" in probe.stderr or "refused" in probe.stderr), probe.stderr


async def test_file_system_is_only_the_scratch_dir(sandbox: Sandbox, tmp_path) -> None:  # type: ignore[no-untyped-def]
    passwd, environ, outside, scratch = await sandbox.grade(
        [row("passwd"), row("proc_environ"), row("write_outside"), row("write_scratch")]
    )
    assert "FileNotFoundError" in passwd.error and "/etc/passwd" in passwd.error
    assert "FileNotFoundError" in environ.error
    assert outside.score is None and "FileNotFoundError" in outside.error
    assert scratch.score == 1.0 and (sandbox.scratch / "mine.txt").exists()
    assert not (sandbox.scratch.parent / "escaped.txt").exists()


async def test_one_eval_cannot_read_another_evals_files(sandbox: Sandbox, tmp_path) -> None:  # type: ignore[no-untyped-def]
    await sandbox.grade([row("write_scratch")])
    secret = sandbox.scratch / "mine.txt"
    async with Sandbox(ESCAPES, owner="eval-b", limits=Limits(row_timeout=1.0), root=tmp_path) as other:
        (result,) = await other.grade([row("read_other", str(secret))])
        (relative,) = await other.grade([row("read_other", f"../{sandbox.scratch.name}/mine.txt")])
    assert result.score is None and "FileNotFoundError" in result.error
    assert relative.score is None and relative.error


async def test_processes_memory_ctypes_and_secrets_are_refused(sandbox: Sandbox) -> None:
    fork, memory, ctypes_row, secrets = await sandbox.grade(
        [row("fork_bomb"), row("allocate_10gb"), row("ctypes"), row("secrets")]
    )
    assert fork.error and "BlockingIOError" in fork.error
    assert memory.error and "MemoryError" in memory.error
    assert ctypes_row.error and "ctypes" in ctypes_row.error
    assert secrets.score == 0.0, "the grader saw a secret in its environment"
    assert sandbox.restarts == 0


async def test_hangs_and_crashes_are_per_row_errors_and_the_worker_comes_back(sandbox: Sandbox) -> None:
    started = time.monotonic()
    results = await sandbox.grade(
        [row("infinite_loop"), row("ok"), row("stubborn_loop"), row("ok"), row("exit_process"), row("ok")]
    )
    assert [r.score for r in results] == [None, 0.75, None, 0.75, None, 0.75]
    assert "timed out" in results[0].error and "timed out" in results[2].error
    assert "died" in results[4].error
    assert sandbox.restarts == 2  # the stubborn loop and the exit; the plain loop was interrupted
    assert time.monotonic() - started < 15


async def test_bad_return_values_are_clear_errors(sandbox: Sandbox) -> None:
    results = await sandbox.grade(
        [row("raise"), row("string"), row("none"), row("too_big"), row("nan"), row("ok")]
    )
    errors = [r.error for r in results]
    assert "ValueError: bad row" in errors[0] and "line" in errors[0]
    assert "must return a number, got str" in errors[1] and "got NoneType" in errors[2]
    assert "outside [0.0, 1.0]" in errors[3] and "not a finite number" in errors[4]
    assert results[5].score == 0.75


async def test_a_grader_that_does_not_load_fails_every_row_clearly(tmp_path) -> None:  # type: ignore[no-untyped-def]
    async with Sandbox("def grader(:\n", root=tmp_path) as broken:
        results = await broken.grade([row("ok"), row("ok")])
    assert all("failed to load" in r.error and "SyntaxError" in r.error for r in results)
    async with Sandbox("import numpy\ndef grader(*a): return 1", root=tmp_path) as missing:
        (result,) = await missing.grade([row("ok")])
    assert "ModuleNotFoundError" in result.error


async def test_many_rows_per_process_fast(tmp_path) -> None:  # type: ignore[no-untyped-def]
    source = "def grader(m, t, tc, g, d):\n    return 1.0 if g == d else 0.0\n"
    rows = [[[], None, None, {"content": str(i % 3)}, {"content": "0"}] for i in range(3000)]
    async with Sandbox(source, root=tmp_path) as box:
        started = time.perf_counter()
        results = await box.grade(rows)
        rate = len(rows) / (time.perf_counter() - started)
    assert sum(r.score for r in results) == 1000
    assert rate > 500, f"{rate:.0f} rows/s"


async def test_concurrent_evals_each_get_their_own_worker(tmp_path) -> None:  # type: ignore[no-untyped-def]
    async def one(n: int) -> float:
        source = f"def grader(*args):\n    return {n} / 10\n"
        async with Sandbox(source, owner=f"eval-{n}", root=tmp_path) as box:
            (result,) = await box.grade([row("x")])
        return result.score

    assert await asyncio.gather(*(one(n) for n in range(3))) == [0.0, 0.1, 0.2]


async def test_the_user_namespace_path_for_non_root_hosts(tmp_path, monkeypatch, listener: int) -> None:  # type: ignore[no-untyped-def]
    """What a pod without root gets: a user namespace, chroot, every capability dropped."""
    import services.eval.sandbox as sandbox_module

    monkeypatch.setattr(sandbox_module, "_PREFIX", sandbox_module.USERNS_PREFIX)
    monkeypatch.setattr(sandbox_module.os, "geteuid", lambda: 1000)  # as if not root: no uid switch
    escape_chroot = """
def grader(m, t, tc, g, d):
    import os
    if g["content"] == "chroot":
        os.mkdir("x")
        os.chroot("x")
        return 1.0
    if g["content"] == "setuid":
        os.setgroups([])  # needs CAP_SETGID, gone with the rest
        return 1.0
    if g["content"] == "ctypes":
        import ctypes
        return 1.0
    return len(open("/etc/passwd").read()) and 1.0
"""
    async with Sandbox(escape_chroot, root=tmp_path) as box:
        chroot, setuid, ctypes_row, passwd = await box.grade(
            [row("chroot"), row("setuid"), row("ctypes"), row("x")]
        )
        network = await Sandbox(ESCAPES, root=tmp_path).__aenter__()
        try:
            (socket_row,) = await network.grade([row("raw_socket", listener)])
        finally:
            await network.close()
    assert "PermissionError" in chroot.error and "PermissionError" in setuid.error
    assert "ModuleNotFoundError" in ctypes_row.error and "FileNotFoundError" in passwd.error
    assert socket_row.error
