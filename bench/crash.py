"""Crash bench: is every acknowledged report still there after a signal and a restart?

    .venv/bin/python bench/crash.py                                   # 5000 reports, kill -9 and Ctrl-C
    .venv/bin/python bench/crash.py --reports 2000 --signals kill9 --profile memory

For each signal: ``distillery up`` on a fresh data dir, ``--reports`` realistic reports at
``--concurrency`` in flight, the signal to the platform process once half are acknowledged (the
rest keep coming and are refused), a restart on the same data dir, then every stored report is
counted. Prints acknowledged / stored / lost / duplicated per signal (the issue's table). Uses
the crash-test helpers (tests/helpers_crash.py); never asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.helpers_crash import Up, burst, send, stored, up_env  # noqa: E402

SIGNALS = {"kill9": signal.SIGKILL, "sigint": signal.SIGINT, "sigterm": signal.SIGTERM}


async def one(name: str, args: argparse.Namespace, root: Path) -> str:
    data_dir = root / name / "data"
    data_dir.mkdir(parents=True)
    env = up_env(DISTILLERY_EMBEDDED_KAFKA_STORAGE="s3" if args.profile == "durable" else "memory")
    up = Up(data_dir, env).start()
    started = up.started_in
    half = args.reports // 2
    result = await burst(
        up.base,
        name,
        args.reports,
        concurrency=args.concurrency,
        trigger_at=half,
        trigger=send(up.process.pid, SIGNALS[name]),
    )
    up.wait_exit(timeout=120)
    again = Up(data_dir, env).start()
    try:
        found = await stored(again.base, name, len(result.acked), timeout=args.timeout)
    finally:
        again.process.send_signal(signal.SIGINT)
        again.wait_exit(timeout=120)
    lost = len(result.acked - set(found))
    duplicated = sum(1 for times in found.values() if times > 1)
    unacked = len(set(found) - result.acked)
    refused = ", ".join(f"{k}: {v}" for k, v in sorted(result.refused.items(), key=str))
    return (
        f"| {name} | {len(result.acked)} | {len(found)} | {lost} | {duplicated} | {unacked} | {refused} "
        f"| {started:.1f} s |"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reports", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--signals", default="kill9,sigint", help=f"comma separated, of {', '.join(SIGNALS)}")
    parser.add_argument("--profile", choices=("durable", "memory"), default="durable")
    parser.add_argument(
        "--timeout", type=float, default=120, help="max wait for the stored count after restart"
    )
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="distillery-crash-"))
    try:
        print(f"{args.reports} reports at concurrency {args.concurrency}, {args.profile} profile")
        print(
            "| signal | acknowledged (200) | stored after restart | lost | duplicated "
            "| stored, not acked | refused | up in |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for name in args.signals.split(","):
            print(await one(name.strip(), args, root), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
