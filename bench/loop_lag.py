"""Event-loop lag while the log writer inserts into chDB from its worker thread.

    .venv/bin/python bench/loop_lag.py            # a few seconds
    .venv/bin/python bench/loop_lag.py --rows 500

The writer inserts on a worker thread; the ClickHouse client encodes each batch in Python there,
holding the GIL for up to the interpreter's switch interval whenever the event loop wants it back.
This inserts batches of sample logs into a throw-away chDB (the writer's own ``insert_rows``) while
a 1 ms ticker runs on the loop, and prints the ticker's lag with Python's default switch interval
(5 ms) and with the one ``distillery up`` sets (``platform.LOOP_SWITCH_INTERVAL``). Never asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from services.common.clickhouse import ClickHouse  # noqa: E402
from services.ingest import store  # noqa: E402
from services.ingest.log_rows import event_to_row, wire_event  # noqa: E402
from services.ingest.models import AnthropicReportRequest, ReportRequest  # noqa: E402
from services.ingest.service import report_to_event  # noqa: E402
from services.platform import LOOP_SWITCH_INTERVAL  # noqa: E402
from services.sample_traffic import ANTHROPIC_ROUTE, sample_reports  # noqa: E402


def sample_rows(n: int) -> list[list]:
    rows = []
    for route, body in sample_reports(n, seed=7):
        anthropic = route == ANTHROPIC_ROUTE
        model = AnthropicReportRequest if anthropic else ReportRequest
        event = report_to_event(
            model.model_validate(body), project_id="bench", source="anthropic" if anthropic else "openai"
        )
        rows.append(event_to_row(wire_event(event), int(time.time() * 1000)))
    return rows


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


async def lag_during_inserts(ch: ClickHouse, batches: list[list[list]]) -> list[float]:
    lags: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        while not done.is_set():
            started = time.perf_counter()
            await asyncio.sleep(0.001)
            lags.append(time.perf_counter() - started - 0.001)

    ticking = asyncio.create_task(ticker())
    for rows in batches:
        await store.insert_rows(ch, rows)
    done.set()
    await ticking
    return lags


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000, help="logs per insert")
    parser.add_argument("--inserts", type=int, default=20)
    args = parser.parse_args()
    rows = sample_rows(args.rows)
    print(f"{args.inserts} inserts of {args.rows} sample logs each, 1 ms ticker on the event loop")
    with tempfile.TemporaryDirectory(prefix="distillery-loop-lag-") as tmp:
        ch = ClickHouse(f"chdb://{tmp}")
        await store.create_schema(ch)
        await store.insert_rows(ch, rows)  # warm up
        for label, interval in (("Python's default", 0.005), ("distillery up's", LOOP_SWITCH_INTERVAL)):
            sys.setswitchinterval(interval)
            lags = [x * 1000 for x in await lag_during_inserts(ch, [rows] * args.inserts)]
            print(
                f"switch interval {interval * 1000:.1f} ms ({label}): loop lag p50 {pct(lags, 50):.2f} ms, "
                f"p99 {pct(lags, 99):.2f} ms, max {max(lags):.2f} ms over {len(lags)} ticks"
            )
        ch.close()


if __name__ == "__main__":
    asyncio.run(main())
