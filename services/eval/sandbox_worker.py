"""The sandboxed grader process: loads one eval's grader, then grades many rows (stdlib only).

Started by ``services.eval.sandbox`` under ``unshare --net`` (a network namespace with no
interfaces) with an empty environment. Before it reads any row it imports the modules a grader
may use, locks itself in: ``chroot`` into the eval's scratch folder (nothing else of the file
system exists any more), drops to an unprivileged per-eval uid, and sets rlimits (CPU time,
address space, no new processes, file size, open files). Python is never trusted to restrict
itself: these are kernel mechanisms, applied before any grader code runs.

Protocol: one JSON object per line on stdin; one JSON line per answer on the protocol fd.
  {"op": "load", "source": str, "entry": "grader" | "grade"}  ->  {"ok": true} | {"error": str}
  {"op": "rows", "rows": [{"args": [...]}, ...], "timeout": s, "min": a, "max": b}
      ->  one {"score": x} | {"error": str} line per row, in order
"""

from __future__ import annotations

import io
import json
import math
import os
import resource
import signal
import sys
import traceback

# Modules a grader may import: loaded before the chroot, so ``import`` finds them in sys.modules.
ALLOWED_MODULES = (
    "bisect",
    "collections",
    "copy",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "enum",
    "fractions",
    "functools",
    "heapq",
    "itertools",
    "json",
    "math",
    "operator",
    "random",
    "re",
    "statistics",
    "string",
    "typing",
    "unicodedata",
)
MAX_CAPTURED_OUTPUT = 2000


class RowTimeout(Exception):
    pass


def _on_alarm(signum: int, frame: object) -> None:
    raise RowTimeout()


def lock_down(scratch: str, uid: int, limits: dict[str, int]) -> None:
    for name in ALLOWED_MODULES:
        __import__(name)
    if uid == 0:
        __import__("ctypes")  # for drop_capabilities after the chroot, which hides the library
    # Before the chroot: /dev/null still exists. A grader's prints must not reach the protocol fd.
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 2)
    os.chdir(scratch)
    os.chroot(scratch)
    os.chdir("/")
    if os.getuid() == 0 and uid > 0:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)  # every capability goes with root
    elif os.getuid() == 0:
        drop_capabilities()  # root of a user namespace: keep the uid, lose the powers
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
    resource.setrlimit(resource.RLIMIT_CPU, (limits["cpu_seconds"], limits["cpu_seconds"] + 1))
    resource.setrlimit(resource.RLIMIT_AS, (limits["memory_bytes"], limits["memory_bytes"]))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file_bytes"], limits["file_bytes"]))
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits["open_files"], limits["open_files"]))


def drop_capabilities() -> None:
    """Clear every capability (and forbid regaining any), so root inside a user namespace can
    neither leave the chroot nor change ids. Python has no capset(2): ctypes calls it, and is then
    dropped from ``sys.modules`` (it cannot be imported again: the chroot has no standard library)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_no_new_privs, pr_capbset_drop, linux_capability_version_3 = 38, 24, 0x20080522
    if libc.prctl(pr_set_no_new_privs, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
    for capability in range(64):
        libc.prctl(pr_capbset_drop, capability, 0, 0, 0)  # fails past the last one: fine
    header = (ctypes.c_uint32 * 2)(linux_capability_version_3, 0)
    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable x 2: all zero
    if libc.capset(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")
    for name in [m for m in sys.modules if m == "ctypes" or m.startswith(("ctypes.", "_ctypes"))]:
        del sys.modules[name]


def _error(exc: BaseException) -> str:
    if isinstance(exc, RowTimeout):
        return "the grader timed out"
    if isinstance(exc, MemoryError):
        return "MemoryError: the grader exceeded its memory limit"
    frames = traceback.extract_tb(exc.__traceback__)
    where = next((f"line {f.lineno}" for f in reversed(frames) if f.filename == "<grader>"), "")
    return f"{type(exc).__name__}: {exc}" + (f" ({where})" if where else "")


def _check(value: object, low: float | None, high: float | None) -> dict:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return {"error": f"the grader must return a number, got {type(value).__name__}"}
    score = float(value)
    if math.isnan(score) or math.isinf(score):
        return {"error": f"the grader returned {score}, not a finite number"}
    if (low is not None and score < low) or (high is not None and score > high):
        return {"error": f"the grader returned {score}, outside [{low}, {high}]"}
    return {"score": score}


def grade_row(entry: object, args: list, timeout: float, low: float | None, high: float | None) -> dict:
    captured = io.StringIO()
    sys.stdout = captured
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        result = _check(entry(*args), low, high)
    except BaseException as exc:  # noqa: BLE001 - a grader may raise anything, SystemExit included
        result = {"error": _error(exc)}
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        sys.stdout = sys.__stdout__
    output = captured.getvalue()
    if output:
        result["stdout"] = output[:MAX_CAPTURED_OUTPUT]
    return result


def serve(requests: io.TextIOBase, answers: io.TextIOBase) -> None:
    entry = None
    for line in requests:
        message = json.loads(line)
        if message["op"] == "load":
            namespace: dict = {"__name__": "grader"}
            try:
                exec(compile(message["source"], "<grader>", "exec"), namespace)  # noqa: S102
                entry = namespace.get(message["entry"])
                answer = {"ok": True} if callable(entry) else {"error": f"no function {message['entry']}()"}
            except BaseException as exc:  # noqa: BLE001
                answer = {"error": f"the grader failed to load: {_error(exc)}"}
            answers.write(json.dumps(answer) + "\n")
            answers.flush()
            continue
        for row in message["rows"]:
            if entry is None:
                result = {"error": "no grader is loaded"}
            else:
                result = grade_row(entry, row["args"], message["timeout"], message["min"], message["max"])
            try:
                text = json.dumps(result)
            except (TypeError, ValueError):
                text = json.dumps({"error": "the grader's answer could not be encoded"})
            answers.write(text + "\n")
            answers.flush()


def main() -> None:
    scratch, uid, limits = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    # The protocol leaves on a private copy of stdout; fd 1 itself goes nowhere.
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    sys.stdout = sys.__stdout__ = io.TextIOWrapper(open(1, "wb", closefd=False))  # noqa: SIM115
    signal.signal(signal.SIGALRM, _on_alarm)
    lock_down(scratch, uid, limits)
    answers.write(json.dumps({"ready": True}) + "\n")
    answers.flush()
    serve(sys.stdin, answers)


if __name__ == "__main__":
    main()
