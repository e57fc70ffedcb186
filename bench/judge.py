"""Judge benchmark: judgements/s and the judge's own overhead, and what best-of-N adds.

    .venv/bin/python bench/judge.py                 # about a minute
    .venv/bin/python bench/judge.py --requests 200  # judgements per concurrency level (default 320)

Starts a fake OpenAI-compatible judge model (``tests/fake_judge.py``'s replies, see
``serve_upstream``) that answers every call after 200 ms, and ``distillery up``, each in its own
process; registers the fake as an external provider of a fresh project and creates two criteria.
Then:

1. ``POST /criteria/judge`` at concurrency 1, 16 and 64 (one caller at 1; at 16 and 64, calls
   arriving as independent callers' do, a Poisson process at 16 or 64 per 200 ms, unless
   ``--arrivals closed``, see ``closed_loop``): judgements/s; "overhead" is the latency
   beyond the upstream's nominal 200 ms (HTTP in, the criteria lookup, rendering, the router's
   path to the upstream and back, parsing the verdict, and any wait for the event loop, the
   client's included); "beyond the upstream's time" is the latency minus the time the fake says
   it held that very call (each call's output carries a mark that reaches the fake in the
   rendered prompt; its timer fires late when its process waits for a core, which is the
   upstream's time, not the judge's); "beyond the model" is the latency minus the judge-model
   call the judge reports in ``Server-Timing`` (the same without the router's path and the
   upstream); "judge's code" is what the judge reports in ``Server-Timing`` for its work minus
   that call (the judge's own work in the server: the criteria lookup, rendering, parsing the
   verdict); "the upstream alone" is the baseline, run just before at the same load: the same
   calls straight to the fake (the client, the loopback and the fake's timer, without the
   platform);
2. best-of-N: ``POST /chat/completions`` with ``n=4`` and ``op-criteria`` naming both criteria
   (8 judge calls) against the same request without criteria, one at a time.

Targets: overhead p99 <= 5 ms; best-of-N adds <= 1.2x one judge call. It never asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import random
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import aiohttp  # noqa: E402
from platform_stack import PYTHON, Http, PlatformStack, cpu_seconds  # noqa: E402

from services.common.kafka import free_port  # noqa: E402
from services.judge.protocol import parse_server_timing  # noqa: E402
from services.router.http1 import Http1Client, Reply  # noqa: E402
from tests.fake_judge import JUDGE_KEY  # noqa: E402

UPSTREAM_LATENCY = 0.2
LEVELS = (1, 16, 64)
JUDGE_BODY = {
    "criterion_id": "bench-a",
    "input": {"messages": [{"role": "user", "content": "What is the capital of Sweden?"}]},
    "output": {"role": "assistant", "content": "Stockholm"},
}
# Each measured call's output carries ``call-<n>``, which reaches the judge model in the rendered
# prompt: the fake records how long it held call n, and the bench subtracts exactly that.
CALL_MARK = re.compile(rb"call-(\d+)")
JUDGE_JSON = json.dumps(JUDGE_BODY).replace("Stockholm", "Stockholm call-{n}")
# what the judge sends the judge model, in short
UPSTREAM_JSON = json.dumps(
    {
        "model": "judge",
        "messages": [
            {"role": "system", "content": "Fail marked mistakes."},
            {"role": "user", "content": "<output>Stockholm call-{n}</output>"},
        ],
        "tools": [{"type": "function", "function": {"name": "record_judgement", "parameters": {}}}],
    }
)
CHAT_BODY = {
    "model": "openpipe:fakejudge/gen",
    "messages": [{"role": "user", "content": "Count to 3"}],
    "n": 4,
}


def serve_upstream(port: int, kind: str) -> None:
    """The fake judge model: ``lean`` (default) answers recorded replies from a bare HTTP/1.1
    protocol, ~20 µs of CPU a call; ``fastapi`` is ``tests/fake_judge.py`` itself, whose ~1 ms a
    call shares the machine's cores with the platform and shows up in the platform's tail."""
    if kind == "fastapi":
        import uvicorn

        from tests.fake_judge import FakeJudge, build_app

        fake = FakeJudge(base_url=f"http://127.0.0.1:{port}", latency=UPSTREAM_LATENCY)
        uvicorn.run(build_app(fake), host="127.0.0.1", port=port, log_level="warning", access_log=False)
        return
    import uvloop

    uvloop.run(serve_lean_upstream(port))


def recorded_replies() -> dict[str, bytes]:
    """What ``tests/fake_judge.py`` answers, as whole HTTP responses: a PASS and a FAIL verdict
    (a forced ``record_judgement`` tool call) and four generated choices, every second one ``[bad]``."""
    from tests.fake_judge import completion_body, tool_call_message

    def verdict(judgement: str) -> dict:
        arguments = json.dumps({"explanation": f"The output gets {judgement}.", "judgement": judgement})
        return completion_body("judge", tool_call_message("record_judgement", arguments), "tool_calls", 120)

    generated = completion_body("gen", {"role": "assistant", "content": "", "refusal": None}, "stop", 12)
    generated["choices"] = [
        {
            "index": i,
            "message": {"role": "assistant", "content": f"candidate {i}" + (" [bad]" if i % 2 else "")},
            "logprobs": None,
            "finish_reason": "stop",
        }
        for i in range(4)
    ]
    bodies = {"PASS": verdict("PASS"), "FAIL": verdict("FAIL"), "generated": generated}
    return {
        name: b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
        % (len(data), data)
        for name, data in ((name, json.dumps(body).encode()) for name, body in bodies.items())
    }


async def serve_lean_upstream(port: int) -> None:
    """Answers each call ``UPSTREAM_LATENCY`` after its request arrived; ``GET /held`` answers (and
    forgets) how long it actually held each marked call, by mark, in seconds (its timer fires late
    when its process waits for a core)."""
    import httptools

    replies = recorded_replies()
    loop = asyncio.get_running_loop()
    held: dict[int, float] = {}

    class Upstream(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport, self.body = transport, []
            self.parser = httptools.HttpRequestParser(self)

        def data_received(self, data: bytes) -> None:
            self.parser.feed_data(data)

        def on_body(self, chunk: bytes) -> None:
            self.body.append(chunk)

        def on_message_complete(self) -> None:
            received = time.perf_counter()
            body, self.body = b"".join(self.body), []
            if self.parser.get_method() == b"GET":
                data = json.dumps(held).encode()
                held.clear()
                self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(data), data))
                return
            if b"record_judgement" not in body:
                reply = replies["generated"]
            else:
                reply = replies["FAIL" if b"[bad]" in body else "PASS"]
            mark = CALL_MARK.search(body)
            loop.call_later(UPSTREAM_LATENCY, self.answer, reply, mark and int(mark[1]), received)

        def answer(self, reply: bytes, mark: int | None, received: float) -> None:
            if not self.transport.is_closing():
                self.transport.write(reply)
                if mark is not None:
                    held[mark] = time.perf_counter() - received

    server = await loop.create_server(Upstream, "127.0.0.1", port, backlog=1024)
    await server.serve_forever()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


@contextmanager
def collector_paused() -> Iterator[None]:
    """The bench's own garbage collector off while it measures: its full collections took 40-85 ms
    at 64 calls in flight, stalling every answer then arriving and showing up as the platform's tail."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


CALLS = itertools.count()


async def judge_level(
    client: Poster, concurrency: int, total: int, arrivals: str
) -> tuple[float, dict[int, float], list[float], list[float], int]:
    """Wall time, latencies by call mark, the time per judgement beyond the judge-model call
    (client-measured), the judge's code's time in the server (both from Server-Timing) and failures."""
    latencies: dict[int, float] = {}
    beyond_model: list[float] = []
    code: list[float] = []
    failures = 0

    async def judge_one() -> None:
        nonlocal failures
        mark = next(CALLS)
        started = time.perf_counter()
        response = await client.post("criteria/judge", JUDGE_JSON.replace("{n}", str(mark)))
        elapsed = time.perf_counter() - started
        if response.status != 200:
            failures += 1
            return
        latencies[mark] = elapsed
        timing_ms = parse_server_timing(response.headers["server-timing"])
        beyond_model.append(elapsed - timing_ms["model"] / 1000)
        code.append((timing_ms["judge"] - timing_ms["model"]) / 1000)

    started = time.perf_counter()
    await make_calls(judge_one, concurrency=concurrency, total=total, arrivals=arrivals)
    return time.perf_counter() - started, latencies, beyond_model, code, failures


async def upstream_level(upstream: Poster, concurrency: int, total: int, arrivals: str) -> dict[int, float]:
    """The baseline: latencies (by call mark) of the same calls made straight to the fake judge
    model (the client's own time, the loopback and the upstream's timer included, the platform not)."""
    latencies: dict[int, float] = {}

    async def call_one() -> None:
        mark = next(CALLS)
        started = time.perf_counter()
        response = await upstream.post("chat/completions", UPSTREAM_JSON.replace("{n}", str(mark)))
        if response.status == 200:
            latencies[mark] = time.perf_counter() - started

    await make_calls(call_one, concurrency=concurrency, total=total, arrivals=arrivals)
    return latencies


async def beyond_upstream(upstream: aiohttp.ClientSession, latencies: dict[int, float]) -> list[float]:
    """Each call's latency minus the time the fake judge model says it held that call, in ms."""
    async with upstream.get("held") as response:
        held = {int(mark): seconds for mark, seconds in (await response.json(content_type=None)).items()}
    return [(latency - held[mark]) * 1000 for mark, latency in latencies.items() if mark in held]


async def make_calls(
    call: Callable[[], Awaitable[None]], *, concurrency: int, total: int, arrivals: str
) -> None:
    if arrivals == "poisson" and concurrency > 1:
        await poisson_arrivals(call, rate=concurrency / UPSTREAM_LATENCY, total=total)
    else:
        await closed_loop(call, concurrency=concurrency, total=total)


async def poisson_arrivals(call: Callable[[], Awaitable[None]], *, rate: float, total: int) -> None:
    """Independent callers: calls start at exponentially distributed intervals (``rate`` a second,
    so ``rate`` x 200 ms are in flight on average), whatever the answers do."""
    rng = random.Random(7)
    calls, next_start = [], time.perf_counter()
    for _ in range(total):
        next_start += rng.expovariate(rate)
        delay = next_start - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        calls.append(asyncio.create_task(call()))
    await asyncio.gather(*calls)


async def closed_loop(call: Callable[[], Awaitable[None]], *, concurrency: int, total: int) -> None:
    """``concurrency`` callers, each starting its next call as its last one is answered. Against an
    upstream that always takes exactly 200 ms, calls answered together start together again: the
    callers bunch (in 5 ms windows, p99 11 starts at 64 callers where Poisson arrivals at the same
    rate have 6), and a bunch queues behind itself in every service it passes."""
    queue = iter(range(total))

    async def caller(phase: float) -> None:
        await asyncio.sleep(phase)
        for _ in queue:
            await call()

    # Callers start spread over one upstream latency, as independent callers would arrive.
    await asyncio.gather(*(caller(i / concurrency * UPSTREAM_LATENCY) for i in range(concurrency)))


async def chat_latencies(client: aiohttp.ClientSession, rounds: int, criteria: bool) -> list[float]:
    headers = {"op-criteria": '["bench-a", "bench-b"]'} if criteria else {}
    out = []
    for _ in range(rounds):
        started = time.perf_counter()
        async with client.post("chat/completions", json=CHAT_BODY, headers=headers) as response:
            body = await response.json()
        out.append(time.perf_counter() - started)
        assert response.status == 200, body
        if criteria:
            assert "criteria_results" in body["choices"][0]
    return out


class Poster:
    """POSTs of ready-made JSON for the measured calls, on the router's lean HTTP/1.1 client
    (``services/router/http1.py``): a third of aiohttp's CPU per call in the bench's own process,
    whose queueing would otherwise read as the judge's latency (the upstream-alone baseline uses
    it too)."""

    def __init__(self, base_url: str, key: str) -> None:
        self.base_url = base_url
        self.headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
        # idle connections are dropped before uvicorn's 5 s keep-alive closes them
        self.http = Http1Client(keepalive_seconds=4)

    async def post(self, path: str, body: str) -> Reply:
        return await self.http.post(self.base_url + path, body.encode(), self.headers, timeout=60)


def json_session(base_url: str, key: str, *, limit: int) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        base_url=base_url,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        timeout=aiohttp.ClientTimeout(total=60),
        # Idle connections are dropped before uvicorn's 5 s keep-alive closes them: reusing one
        # as the server closes it gave a "connection reset by peer" once.
        connector=aiohttp.TCPConnector(limit=limit, keepalive_timeout=4),
    )


async def measure(
    port: int,
    key: str,
    requests: int,
    rounds: int,
    pid: int,
    arrivals: str,
    upstream_port: int,
    levels: tuple[int, ...] = LEVELS,
) -> list[str]:
    lines = []
    # The measured calls go through ``Poster``; aiohttp (not httpx, whose CPU at 64 in flight
    # saturated the bench's loop) serves the rest: the fake's hold times and best-of-N.
    async with (
        json_session(f"http://127.0.0.1:{port}/api/v1/", key, limit=128) as client,
        json_session(f"http://127.0.0.1:{upstream_port}/v1/", JUDGE_KEY, limit=512) as upstream,
    ):
        poster = Poster(f"http://127.0.0.1:{port}/api/v1/", key)
        upstream_poster = Poster(f"http://127.0.0.1:{upstream_port}/v1/", JUDGE_KEY)
        await judge_level(poster, 4, 16, "closed")  # warm up connections and code paths
        lines.append(
            "| concurrency | judgements | judgements/s | latency p50 | overhead p50 / p99 "
            "| beyond the upstream's time p50 / p99 | beyond the model p50 / p99 "
            "| judge's code p50 / p99 | platform CPU per judgement | failed "
            "| the upstream alone: overhead p50 / p99 | the upstream alone: beyond its time p50 / p99 |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        one_judge = UPSTREAM_LATENCY
        for level in levels:
            total = min(100, requests) if level == 1 else max(requests, level * 2)
            with collector_paused():
                alone_by_call = await upstream_level(upstream_poster, level, total, arrivals)
            alone = [(x - UPSTREAM_LATENCY) * 1000 for x in alone_by_call.values()]
            alone_beyond = await beyond_upstream(upstream, alone_by_call)
            cpu_before = cpu_seconds(pid)
            with collector_paused():
                wall, by_call, beyond_model, code, failed = await judge_level(poster, level, total, arrivals)
            cpu_ms = (cpu_seconds(pid) - cpu_before) * 1000 / max(1, len(by_call))
            latencies = list(by_call.values())
            overhead = [(x - UPSTREAM_LATENCY) * 1000 for x in latencies]
            beyond_upstream_ms = await beyond_upstream(upstream, by_call)
            beyond_ms = [x * 1000 for x in beyond_model]
            code_ms = [x * 1000 for x in code]
            if level == 1:
                one_judge = statistics.median(latencies)
            lines.append(
                f"| {level} | {len(latencies)} | {len(latencies) / wall:.1f} | "
                f"{pct(latencies, 50) * 1000:.1f} ms | "
                f"{pct(overhead, 50):.1f} / {pct(overhead, 99):.1f} ms | "
                f"{pct(beyond_upstream_ms, 50):.1f} / {pct(beyond_upstream_ms, 99):.1f} ms | "
                f"{pct(beyond_ms, 50):.1f} / {pct(beyond_ms, 99):.1f} ms | "
                f"{pct(code_ms, 50):.2f} / {pct(code_ms, 99):.2f} ms | {cpu_ms:.1f} ms | {failed} | "
                f"{pct(alone, 50):.1f} / {pct(alone, 99):.1f} ms | "
                f"{pct(alone_beyond, 50):.1f} / {pct(alone_beyond, 99):.1f} ms |"
            )
            print(lines[-1], flush=True)
        await chat_latencies(client, 2, True)
        plain = await chat_latencies(client, rounds, False)
        judged = await chat_latencies(client, rounds, True)
        added = statistics.median(judged) - statistics.median(plain)
        lines.append("")
        lines.append(
            f"best-of-N (n=4, 2 criteria = 8 judge calls): p50 "
            f"{statistics.median(plain) * 1000:.0f} ms without "
            f"criteria, {statistics.median(judged) * 1000:.0f} ms with; added {added * 1000:.0f} ms = "
            f"{added / one_judge:.2f}x one judge call ({one_judge * 1000:.0f} ms)"
        )
        print(lines[-1], flush=True)
        await poster.http.close()
        await upstream_poster.http.close()
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=320)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument(
        "--levels",
        type=lambda text: tuple(int(x) for x in text.split(",")),
        default=LEVELS,
        help="concurrency levels, comma-separated (default 1,16,64)",
    )
    parser.add_argument("--keep", action="store_true")
    parser.add_argument(
        "--upstream",
        choices=("lean", "fastapi"),
        default="lean",
        help="the fake judge model: recorded replies from a bare HTTP server, or tests/fake_judge.py",
    )
    parser.add_argument(
        "--arrivals",
        choices=("poisson", "closed"),
        default="poisson",
        help="how calls start at concurrency > 1: independent callers, or a closed loop of callers",
    )
    parser.add_argument("--serve-upstream", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_upstream:
        serve_upstream(args.serve_upstream, args.upstream)
        return 0
    upstream_port = free_port()
    upstream = subprocess.Popen(
        [PYTHON, __file__, "--serve-upstream", str(upstream_port), "--upstream", args.upstream], cwd=ROOT
    )
    try:
        with PlatformStack(args.keep, prefix="distillery-judge-bench-") as stack:
            stack.start_broker()
            _, key = stack.create_key("judge-bench")
            # Poisson arrivals at 64 in flight on average go past the judge's per-project cap (64
            # calls to the judge model) about half the time, where they would wait for a slot by
            # design; what is measured here is the judge's overhead, not that wait.
            stack.start_platform(env={"DISTILLERY_JUDGE_PROJECT_MAX_CONCURRENCY": "256"})
            print(f"platform pid {stack.up.pid}", flush=True)
            http = Http(stack.port, key)
            status, body = http.json(
                "POST",
                "/api/v1/external-providers",
                {
                    "slug": "fakejudge",
                    "type": "openai",
                    "baseUrl": f"http://127.0.0.1:{upstream_port}/v1",
                    "apiKey": "sk-fake-judge-0123456789",
                },
            )
            assert status == 201, body
            for name in ("bench-a", "bench-b"):
                status, body = http.json(
                    "POST",
                    "/api/v1/criteria",
                    {"name": name, "model": "openpipe:fakejudge/judge", "prompt": "Fail marked mistakes."},
                )
                assert status == 201, body
            stack.wait_for(
                lambda: http.json("POST", "/api/v1/criteria/judge", JUDGE_BODY)[0] == 200, 30, "judging"
            )
            http.close()
            lines = asyncio.run(
                measure(
                    stack.port,
                    key,
                    args.requests,
                    args.rounds,
                    stack.up.pid,
                    args.arrivals,
                    upstream_port,
                    args.levels,
                )
            )
            print("\n".join(lines))
    finally:
        upstream.terminate()
        upstream.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
