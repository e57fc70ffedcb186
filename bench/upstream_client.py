"""The router's two HTTP clients side by side: event-loop CPU and latency per upstream call.

    .venv/bin/python bench/upstream_client.py                  # a few seconds
    .venv/bin/python bench/upstream_client.py --requests 20000

Starts ``bench/router.py``'s instant upstream (a canned ``chat.completion`` from a bare asyncio
server) in its own process, then sends the same judge-sized JSON POST (a ~1 KB body, the headers
a provider call carries) with the aiohttp session the router streams on (``Upstream.session``)
and with the lean client its whole-answer calls use (``Upstream.http``,
``services/router/http1.py``), alternately, one at a time and 32 at once. Prints the client
process's CPU per call and the latency p50/p99. It never asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import orjson  # noqa: E402
import uvloop  # noqa: E402
from router import OPENAI_KEY, serve_upstream  # noqa: E402

from services.common.kafka import free_port  # noqa: E402
from services.router.upstream import RetryPolicy, Upstream  # noqa: E402

REQUEST = {
    "model": "judge",
    "messages": [
        {"role": "system", "content": "You are an impartial judge. " * 20},
        {"role": "user", "content": "<output>Stockholm</output>" * 10},
    ],
    "tools": [{"type": "function", "function": {"name": "record_judgement", "parameters": {}}}],
    "temperature": 0,
}
HEADERS = {"content-type": "application/json", "authorization": f"Bearer {OPENAI_KEY}"}


async def measure(
    call: Callable[[], Awaitable[None]], requests: int, concurrency: int
) -> tuple[float, list[float]]:
    """CPU per call (µs) and each call's latency (ms)."""
    latencies: list[float] = []
    queue = iter(range(requests))

    async def worker() -> None:
        for _ in queue:
            started = time.perf_counter()
            await call()
            latencies.append((time.perf_counter() - started) * 1000)

    cpu = time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return (time.process_time() - cpu) / requests * 1e6, latencies


async def run(port: int, requests: int, rounds: int) -> None:
    upstream = Upstream(timeout=30, retry=RetryPolicy())
    base = f"http://127.0.0.1:{port}/v1"
    session = upstream.session(base)
    body = orjson.dumps(REQUEST)

    async def aiohttp_call() -> None:
        async with session.post(f"{base}/chat/completions", data=body, headers=HEADERS) as response:
            orjson.loads(await response.read())

    async def http1_call() -> None:
        reply = await upstream.http.post(f"{base}/chat/completions", body, HEADERS, timeout=30)
        orjson.loads(reply.body)

    clients = {"aiohttp (streams)": aiohttp_call, "http1 (whole answers)": http1_call}
    print("| client | in flight | CPU per call | latency p50 | latency p99 |")
    print("|---|---|---|---|---|")
    for concurrency in (1, 32):
        results: dict[str, list[tuple[float, list[float]]]] = {name: [] for name in clients}
        for call in clients.values():
            await measure(call, 500, concurrency)  # warm up connections and code paths
        for _ in range(rounds):
            for name, call in clients.items():
                results[name].append(await measure(call, requests, concurrency))
        for name, runs in results.items():
            cpu = statistics.median(c for c, _ in runs)
            latencies = sorted(x for _, lat in runs for x in lat)
            p50, p99 = latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.99)]
            print(f"| {name} | {concurrency} | {cpu:.0f} µs | {p50:.2f} ms | {p99:.2f} ms |")
    await upstream.close()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=5000, help="calls per client per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    port = free_port()
    server = mp.get_context("spawn").Process(target=serve_upstream, args=(port,), daemon=True)
    server.start()
    try:
        time.sleep(1.0)
        uvloop.run(run(port, args.requests, args.rounds))
    finally:
        server.terminate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
