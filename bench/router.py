"""Router overhead benchmark: the latency ``POST /chat/completions`` adds over an instant upstream.

    .venv/bin/python bench/router.py                                          # defaults, about 3 minutes
    .venv/bin/python bench/router.py --requests 1000 --levels 50 --rate-seconds 3   # quick look

Starts an OpenAI-compatible upstream that answers instantly and ``distillery up`` (its OpenAI base
URL pointed at that upstream), each in its own process, and sends the same request, side by side
in one run, (a) straight to the upstream and (b) through the router:

1. the upstream alone, to show it is not the bottleneck;
2. open loop: a fixed arrival rate (500 requests/s for 10 s by default), which is what the target
   is stated at: the router adds p50 <= 1 ms and p99 <= 5 ms;
3. closed loop at 50, 200 and 500 connections, each keeping one request in flight.

Each run is done non-streaming (``json``) and streaming (``stream``: time to first byte and to
last byte), and prints p50/p99 direct, through the router and the difference ("added"),
requests/s, failures, the platform's CPU per request and the cores each process kept busy. The
load comes from Python processes (uvloop, raw HTTP/1.1 on keep-alive connections); with
``--client wrk`` the closed-loop runs use wrk instead (less client CPU, no time to first byte).
How to read the numbers: ``bench/README.md``. It never asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from platform_stack import CLOCK_TICKS, PYTHON, Http, PlatformStack, cpu_seconds  # noqa: E402

from services.common.kafka import free_port  # noqa: E402

TARGET_RATE = 500  # requests/s at which the overhead target is stated
TARGET_P50_MS = 1.0
TARGET_P99_MS = 5.0

OPENAI_KEY = "sk-bench-openai-0123456789"
MODEL = "gpt-4o-mini"
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Count to 3"}]
DIRECT_PATH = "/v1/chat/completions"
ROUTER_PATH = "/api/v1/chat/completions"

# --- the instant upstream (its own process: ``bench/router.py --serve-upstream PORT``) -----------

COMPLETION = {
    "id": "chatcmpl-AbenchAbenchAbenchAbenchAbench",
    "object": "chat.completion",
    "created": 1730000000,
    "model": "gpt-4o-mini-2024-07-18",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "1, 2, 3.", "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {
        "prompt_tokens": 19,
        "completion_tokens": 8,
        "total_tokens": 27,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    },
    "service_tier": "default",
    "system_fingerprint": "fp_bench0001",
}


def _stream_events() -> list[dict]:
    base = {
        "id": COMPLETION["id"],
        "object": "chat.completion.chunk",
        "created": COMPLETION["created"],
        "model": COMPLETION["model"],
        "system_fingerprint": COMPLETION["system_fingerprint"],
    }
    deltas = [{"role": "assistant", "content": "", "refusal": None}, {"content": "1"}, {"content": ", 2"}]
    events = [
        {**base, "choices": [{"index": 0, "delta": d, "logprobs": None, "finish_reason": None}]}
        for d in [*deltas, {"content": ", 3."}]
    ]
    events.append({**base, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]})
    return events


def _http_chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _canned_responses() -> tuple[bytes, bytes, bytes]:
    body = json.dumps(COMPLETION, separators=(",", ":")).encode()
    plain = (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body)
    ) + body
    events = [b"data: " + json.dumps(e, separators=(",", ":")).encode() + b"\n\n" for e in _stream_events()]
    events.append(b"data: [DONE]\n\n")
    stream = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
        b"transfer-encoding: chunked\r\n\r\n" + b"".join(_http_chunk(e) for e in events) + b"0\r\n\r\n"
    )
    error = json.dumps(
        {
            "error": {
                "message": "Incorrect API key provided",
                "type": "invalid_request_error",
                "param": None,
                "code": "invalid_api_key",
            }
        },
        separators=(",", ":"),
    ).encode()
    unauthorized = (
        b"HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
        % len(error)
    ) + error
    return plain, stream, unauthorized


CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)")


def serve_upstream(port: int) -> None:
    """A minimal OpenAI-compatible ``POST /v1/chat/completions``: canned answer, no await, no parsing
    beyond finding the body and ``"stream":true``; checks the bearer key the router must forward."""
    _install_uvloop()
    plain, stream, unauthorized = _canned_responses()
    auth = b"\r\nauthorization: bearer " + OPENAI_KEY.lower().encode() + b"\r\n"

    class Upstream(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport
            self.buffer = bytearray()

        def data_received(self, data: bytes) -> None:
            buffer = self.buffer
            buffer += data
            while True:
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = bytes(buffer[: end + 2]).lower()
                match = CONTENT_LENGTH.search(head)
                total = end + 4 + (int(match.group(1)) if match else 0)
                if len(buffer) < total:
                    return
                body = bytes(buffer[end + 4 : total])
                del buffer[:total]
                if auth not in head:
                    self.transport.write(unauthorized)
                else:
                    self.transport.write(stream if b'"stream":true' in body else plain)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Upstream, "127.0.0.1", port, backlog=4096, reuse_address=True)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print("ready", flush=True)
        await stop.wait()
        server.close()

    asyncio.run(main())


# --- the Python load generator (worker processes) -------------------------------------------------


def _install_uvloop() -> bool:
    try:
        import uvloop
    except ImportError:
        return False
    uvloop.install()
    return True


class Conn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; ``send`` resolves to (first body byte, last byte, status)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.waiter: asyncio.Future | None = None
        self.buffer = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection closed"))

    def send(self, request: bytes) -> asyncio.Future:
        if self.closed or self.transport is None or self.transport.is_closing():
            raise ConnectionError("connection closed")  # e.g. the server's keep-alive timeout
        self.buffer = bytearray()
        self.head_end = -1
        self.first = 0.0
        self.length = -1
        self.pos = 0
        self.status = 0
        self.close_after = False
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        buffer = self.buffer
        buffer += data
        if self.head_end < 0:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            self.head_end = self.pos = end + 4
            head = bytes(buffer[: end + 2]).lower()
            self.status = int(head[9:12])
            self.close_after = b"\r\nconnection: close\r\n" in head
            match = CONTENT_LENGTH.search(head)
            if match:
                self.length = int(match.group(1))
            elif b"\r\ntransfer-encoding: chunked\r\n" not in head:
                self.length = 0
        if not self.first and len(buffer) > self.head_end:
            self.first = now
        if self.length >= 0:
            if len(buffer) - self.head_end >= self.length:
                self._done(now)
            return
        while True:  # chunked: walk the chunks; the zero-size one ends the body
            eol = buffer.find(b"\r\n", self.pos)
            if eol < 0:
                return
            size = int(bytes(buffer[self.pos : eol]).split(b";", 1)[0], 16)
            if size == 0:
                if len(buffer) >= eol + 4:
                    self._done(now)
                return
            if len(buffer) < eol + 2 + size + 2:
                return
            self.pos = eol + 2 + size + 2

    def _done(self, now: float) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result((self.first or now, now, self.status))
        if self.close_after and self.transport is not None:
            self.transport.close()


@dataclass
class Job:
    port: int
    request: bytes
    kind: str  # "closed" | "open"
    conns: int  # closed: connections (each keeps one request in flight); open: pre-opened
    requests: int  # closed: quota for this process; open: how many to send
    seconds: float  # closed: stop after this long; open: duration of the schedule
    rate: float = 0.0  # open: arrivals per second for this process


def _load_worker(job: Job, ready, go, out) -> None:
    _install_uvloop()
    ttlb: list[float] = []
    ttfb: list[float] = []
    late: list[float] = []
    counts = {"ok": 0, "non200": 0, "errors": 0, "timeouts": 0}
    statuses: dict[int, int] = {}

    async def connect() -> Conn:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(Conn, "127.0.0.1", job.port)
        return conn

    async def one(conn: Conn) -> Conn | None:
        """Send the request on ``conn`` and record it; the connection if it is still usable."""
        t0 = time.perf_counter()
        try:
            first, last, status = await conn.send(job.request)
        except (ConnectionError, OSError):
            counts["errors"] += 1
            return None
        if status == 200:
            counts["ok"] += 1
            ttlb.append(last - t0)
            ttfb.append(first - t0)
        else:
            counts["non200"] += 1
            statuses[status] = statuses.get(status, 0) + 1
        return None if conn.closed else conn

    async def closed_loop(conns: list[Conn], deadline: float) -> None:
        left = [job.requests]

        async def run(conn: Conn | None) -> None:
            while left[0] > 0 and time.perf_counter() < deadline:
                left[0] -= 1
                try:
                    if conn is None or conn.closed:  # a server may close an idle connection
                        conn = await connect()
                except OSError:
                    counts["errors"] += 1
                    await asyncio.sleep(0.01)
                    continue
                conn = await one(conn)
            if conn is not None:
                conn.transport.close()

        await asyncio.gather(*(run(c) for c in conns))

    async def open_loop(conns: list[Conn], start: float) -> None:
        idle = deque(conns)
        pending: set[asyncio.Task] = set()

        async def fire() -> None:
            conn = None
            while idle and conn is None:
                conn = idle.pop()
                conn = None if conn.closed else conn
            try:
                conn = conn or await connect()
            except OSError:
                counts["errors"] += 1
                return
            conn = await one(conn)
            if conn is not None:
                idle.append(conn)

        for i in range(job.requests):
            due = start + i / job.rate
            wait = due - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            late.append(time.perf_counter() - due)
            task = asyncio.ensure_future(fire())
            pending.add(task)
            task.add_done_callback(pending.discard)
        if pending:  # an overloaded target is given as long again as the schedule, then dropped
            _, unanswered = await asyncio.wait(pending, timeout=max(5.0, job.seconds))
            counts["timeouts"] = len(unanswered)
            for task in unanswered:
                task.cancel()
        for conn in idle:
            conn.transport.close()

    async def main() -> dict:
        conns = await asyncio.gather(*(connect() for _ in range(job.conns)))
        # One unrecorded request on a few connections (first-use paths on both sides); warming all
        # 500 would take half a minute on a slow router, and idle ones get closed meanwhile.
        warm = await asyncio.gather(*(c.send(job.request) for c in conns[:16]), return_exceptions=True)
        bad = [w for w in warm if isinstance(w, BaseException) or w[2] != 200]
        ready.set()
        await asyncio.to_thread(go.wait)  # all workers start together
        cpu0 = os.times()
        start = time.perf_counter()
        if job.kind == "closed":
            await asyncio.wait_for(
                closed_loop([c for c in conns if not c.closed], start + job.seconds), job.seconds + 60
            )
        else:
            await open_loop([c for c in conns if not c.closed], start + 0.005)
        end = time.perf_counter()
        cpu1 = os.times()
        return {
            "start": start,
            "end": end,
            "cpu": (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system),
            "warm_failures": len(bad),
            "warm_example": repr(bad[0])[:200] if bad else None,
        }

    try:
        info = asyncio.run(main())
        error = None
    except Exception as exc:  # reported by the parent
        info, error = (
            {"start": 0.0, "end": 0.0, "cpu": 0.0, "warm_failures": 0, "warm_example": None},
            repr(exc),
        )
    out.send(
        {
            **info,
            "ttlb": ttlb,
            "ttfb": ttfb,
            "late": late,
            "counts": counts,
            "statuses": statuses,
            "error": error,
        }
    )
    out.close()


# --- running a load and what it measured ---------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def children(pid: int) -> list[int]:
    try:
        found = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    return [int(c) for c in found]


def tree_cpu(pid: int | None) -> float:
    """CPU of a process and its descendants (``distillery up`` starts Tansu as a child)."""
    if pid is None:
        return 0.0
    return cpu_seconds(pid) + sum(tree_cpu(c) for c in children(pid))


@dataclass
class Load:
    label: str
    target: str  # "direct" | "router"
    ttlb: list[float] = field(default_factory=list)  # seconds
    ttfb: list[float] = field(default_factory=list)
    late: list[float] = field(default_factory=list)
    ok: int = 0
    non200: int = 0
    errors: int = 0
    timeouts: int = 0  # open loop: still unanswered when the run was cut off
    statuses: dict[int, int] = field(default_factory=dict)
    wall: float = float("nan")
    cpu: dict[str, float] = field(default_factory=dict)  # cores busy, by part
    platform_cpu_s: float = 0.0  # platform CPU seconds during the run
    client: str = "python"
    notes: list[str] = field(default_factory=list)

    @property
    def rps(self) -> float:
        return self.ok / self.wall if self.wall and self.wall == self.wall else float("nan")

    def ms(self, q: float, first: bool = False) -> float:
        return pct(self.ttfb if first else self.ttlb, q) * 1000


def machine_cpu() -> float:
    """CPU seconds the whole machine has spent busy (all processes, all cores), from /proc/stat."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return float("nan")
    ticks = [int(x) for x in fields]
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / CLOCK_TICKS  # minus idle and iowait


class Machine:
    """The processes whose CPU is reported: the upstream and the platform (with Tansu), and the
    whole machine, so that CPU taken by anything else running here shows up as "other"."""

    def __init__(self) -> None:
        self.pids: dict[str, int | None] = {"upstream": None, "platform": None}

    def snapshot(self) -> dict[str, float]:
        snap = {name: tree_cpu(pid) for name, pid in self.pids.items()}
        snap["machine"] = machine_cpu()
        snap["wall"] = time.time()
        return snap

    def busy(self, before: dict[str, float]) -> tuple[dict[str, float], float]:
        """Cores each part kept busy since ``before``, and the platform's CPU seconds."""
        now = self.snapshot()
        wall = max(1e-9, now["wall"] - before["wall"])
        cores = {name: (now[name] - before[name]) / wall for name in (*self.pids, "machine")}
        return cores, now["platform"] - before["platform"]


def run_python(
    machine: Machine,
    label: str,
    target: str,
    job: Job,
    processes: int,
) -> Load:
    ctx = mp.get_context("spawn")
    go = ctx.Event()
    workers = []
    for w in range(processes):
        share = Job(
            port=job.port,
            request=job.request,
            kind=job.kind,
            conns=job.conns // processes + (1 if w < job.conns % processes else 0),
            requests=job.requests // processes + (1 if w < job.requests % processes else 0),
            seconds=job.seconds,
            rate=job.rate / processes,
        )
        ready = ctx.Event()
        recv, send = ctx.Pipe(duplex=False)
        process = ctx.Process(target=_load_worker, args=(share, ready, go, send), daemon=True)
        process.start()
        workers.append((process, ready, recv))
    for process, ready, _ in workers:
        if not ready.wait(120):
            raise RuntimeError(f"load worker {process.pid} did not get ready (connect/warm-up)")
    before = machine.snapshot()
    go.set()
    results = []
    for process, _, recv in workers:
        if not recv.poll(job.seconds + 120):
            raise RuntimeError(f"load worker {process.pid} did not finish")
        results.append(recv.recv())
        process.join(10)
    busy, platform_cpu_s = machine.busy(before)
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    load = Load(label, target, client=f"python x{processes}", platform_cpu_s=platform_cpu_s)
    for r in results:
        load.ttlb += r["ttlb"]
        load.ttfb += r["ttfb"]
        load.late += r["late"]
        load.ok += r["counts"]["ok"]
        load.non200 += r["counts"]["non200"]
        load.errors += r["counts"]["errors"]
        load.timeouts += r["counts"]["timeouts"]
        for status, n in r["statuses"].items():
            load.statuses[status] = load.statuses.get(status, 0) + n
        if r["error"]:
            load.notes.append(f"worker failed: {r['error']}")
        if r["warm_failures"]:
            load.notes.append(f"{r['warm_failures']} warm-up requests failed, e.g. {r['warm_example']}")
    load.wall = wall
    load.cpu = {**busy, "client": sum(r["cpu"] for r in results) / max(1e-9, wall)}
    return load


def other_cpu(cpu: dict[str, float]) -> float:
    """Cores busy with processes that are not part of the run (other work on this machine)."""
    ours = cpu.get("client", 0) + cpu.get("platform", 0) + cpu.get("upstream", 0)
    return max(0.0, cpu.get("machine", 0) - ours)


WRK_SCRIPT = r"""
-- args: path, bearer key, file holding the JSON body. Prints "S <counts and percentiles>" at the end.
local req
function init(args)
  local f = io.open(args[3], "rb"); local body = f:read("*a"); f:close()
  req = wrk.format("POST", args[1], {["Content-Type"] = "application/json",
                                     ["Authorization"] = "Bearer " .. args[2]}, body)
end
function request() return req end
function done(summary, latency, requests)
  local e = summary.errors
  io.stdout:write(string.format("S %d %d %d %d %d %d %d %d %d\n", summary.requests, summary.duration,
    e.connect, e.read, e.write, e.status, e.timeout, latency:percentile(50), latency:percentile(99)))
end
"""


def run_wrk(
    machine: Machine,
    label: str,
    target: str,
    port: int,
    path: str,
    auth: str,
    body: bytes,
    conns: int,
    seconds: float,
    tmp: Path,
) -> Load:
    script, body_file = tmp / "bench.lua", tmp / f"body-{os.getpid()}.json"
    script.write_text(WRK_SCRIPT)
    body_file.write_bytes(body)
    threads = min(2, conns)
    cmd = [
        "wrk",
        f"-t{threads}",
        f"-c{conns}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "30s",
        "-s",
        str(script),
        f"http://127.0.0.1:{port}",
        "--",
        path,
        auth,
        str(body_file),
    ]
    before = machine.snapshot()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = 0.0
    while proc.poll() is None:
        peak = max(peak, cpu_seconds(proc.pid))
        time.sleep(0.1)
    output = proc.stdout.read() if proc.stdout else ""
    busy, platform_cpu_s = machine.busy(before)
    load = Load(label, target, client="wrk", platform_cpu_s=platform_cpu_s)
    summary = next((line.split()[1:] for line in output.splitlines() if line.startswith("S ")), None)
    if summary is None:
        load.notes.append(f"wrk gave no summary: {output[-300:]!r}")
        return load
    n, duration_us, connect, read, write, status, timeout, p50, p99 = (int(x) for x in summary)
    load.wall = duration_us / 1e6
    load.non200 = status
    load.errors = connect + read + write + timeout
    load.ok = n - status
    # wrk keeps percentiles, not samples: stand-ins that reproduce p50 and p99 exactly.
    load.ttlb = [p50 / 1e6] * 98 + [p99 / 1e6] * 2
    load.cpu = {**busy, "client": peak / max(1e-9, load.wall)}
    return load


# --- the stack under test ------------------------------------------------------------------------


class Stack(PlatformStack):
    """The instant upstream and ``distillery up`` (on its embedded Tansu) on a temporary data dir."""

    def __init__(self, keep: bool, project_limit: int) -> None:
        super().__init__(keep, prefix="distillery-router-bench-")
        self.project_limit = project_limit
        self.key = "opk_bench_" + secrets.token_urlsafe(24)
        self.upstream: subprocess.Popen | None = None
        self.machine = Machine()

    def start_upstream(self) -> None:
        self.upstream_port = free_port()
        self.upstream = subprocess.Popen(
            [PYTHON, str(Path(__file__).resolve()), "--serve-upstream", str(self.upstream_port)],
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        line = self.upstream.stdout.readline() if self.upstream.stdout else ""
        if line.strip() != "ready":
            raise RuntimeError(f"upstream did not start: {line!r}")
        self.machine.pids["upstream"] = self.upstream.pid

    def start_router(self) -> None:
        env = {
            "DISTILLERY_BOOTSTRAP_API_KEY": self.key,
            "DISTILLERY_OPENAI_BASE_URL": f"http://127.0.0.1:{self.upstream_port}/v1",
        }
        if self.project_limit:
            env["DISTILLERY_PROJECT_MAX_CONCURRENCY"] = str(self.project_limit)
        self.start_platform(env=env)
        self.machine.pids["platform"] = self.up.pid
        client = Http(self.port, self.key, timeout=10)
        status, text = client.request(
            "PUT", "/api/v1/provider-keys", json.dumps({"openai": OPENAI_KEY}).encode()
        )
        if status != 200:
            raise RuntimeError(f"PUT /provider-keys -> {status}: {text[:300]!r}\n{self.log_tail()}")
        body = json.dumps({"model": MODEL, "messages": MESSAGES}).encode()

        def answers() -> bool:  # the key reaches the router over catalog.v1 within a second or so
            status, text = client.request("POST", ROUTER_PATH, body)
            if status not in (200, 400):
                raise RuntimeError(f"POST /chat/completions -> {status}: {text[:300]!r}")
            return status == 200

        try:
            self.wait_for(answers, 60, "serving completions")
        finally:
            client.close()

    def stop(self) -> None:
        if self.upstream and self.upstream.poll() is None:
            self.upstream.terminate()
            try:
                self.upstream.wait(10)
            except subprocess.TimeoutExpired:
                self.upstream.kill()
                self.upstream.wait()
        super().stop()


def build_request(port: int, path: str, key: str, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nAccept: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def request_body(stream: bool, store: bool) -> bytes:
    body: dict = {"model": MODEL, "messages": MESSAGES}
    if stream:
        body["stream"] = True
    if store:
        body["store"] = True
    return json.dumps(body, separators=(",", ":")).encode()


# --- report --------------------------------------------------------------------------------------


def f(value: float, width: int = 7, digits: int = 2) -> str:
    return f"{value:{width}.{digits}f}" if value == value else f"{'n/a':>{width}}"


def failed(load: Load) -> int:
    return load.non200 + load.errors + load.timeouts


def errors(load: Load) -> str:
    parts = [f"{n} x HTTP {s}" for s, n in sorted(load.statuses.items())]
    if load.errors:
        parts.append(f"{load.errors} connection errors")
    if load.timeouts:
        parts.append(f"{load.timeouts} unanswered when the run was cut off")
    return ", ".join(parts) or "none"


def cpu_per_request_us(load: Load) -> float:
    """Platform CPU per answered request: robust to other load on the machine, unlike latency."""
    return load.platform_cpu_s / load.ok * 1e6 if load.ok else float("nan")


def header(first: str) -> str:
    return (
        f"{first:>6} {'mode':<13}| {'direct p50':>10} {'p99':>7} | {'router p50':>10} {'p99':>8} | "
        f"{'added p50':>9} {'p99':>8} | {'req/s dir':>9} {'router':>6} | {'failed':>6} | {'CPU/req':>7} | "
        "cores: client platform upstream other"
    )


def rows(label: str, direct: Load, router: Load) -> list[str]:
    lines = []
    metrics = [("", False)] if router.label == "json" else [(" first", True), (" last", False)]
    for suffix, first in metrics:
        if first and router.client == "wrk":
            continue
        d50, d99 = direct.ms(50, first), direct.ms(99, first)
        r50, r99 = router.ms(50, first), router.ms(99, first)
        cpu = router.cpu
        lines.append(
            f"{label:>6} {router.label + suffix:<13}| {f(d50, 10)} {f(d99)} | {f(r50, 10)} {f(r99, 8)} | "
            f"{f(r50 - d50, 9)} {f(r99 - d99, 8)} | {f(direct.rps, 9, 0)} {f(router.rps, 6, 0)} | "
            f"{failed(direct) + failed(router):>6} | {f(cpu_per_request_us(router), 4, 0)} us | "
            f"{cpu.get('client', 0):12.2f} {cpu.get('platform', 0):8.2f} {cpu.get('upstream', 0):8.2f} "
            f"{other_cpu(cpu):5.2f}"
        )
    return lines


def print_notes(*loads: Load) -> None:
    for load in loads:
        if other_cpu(load.cpu) > 0.25:
            load.notes.append(
                f"other processes kept {other_cpu(load.cpu):.2f} cores busy: latencies are inflated"
            )
        if failed(load):
            load.notes.insert(0, f"failed: {errors(load)}")
        for note in load.notes:
            print(f"       note ({load.target} {load.label}): {note}")


def headline(rate: float, mode: str, direct: Load, router: Load) -> list[str]:
    lines = []
    metrics = (
        [("", False)] if mode == "json" else [(" stream first byte", True), (" stream last byte", False)]
    )
    for what, first in metrics:
        a50 = router.ms(50, first) - direct.ms(50, first)
        a99 = router.ms(99, first) - direct.ms(99, first)
        ok = a50 <= TARGET_P50_MS and a99 <= TARGET_P99_MS and not failed(router)
        why = "" if not failed(router) else f"; {failed(router)} requests failed or unanswered"
        lines.append(
            f"router overhead @{rate:.0f}rps{what}: p50={a50:.2f} ms p99={a99:.2f} ms "
            f"(target ≤{TARGET_P50_MS:g} / ≤{TARGET_P99_MS:g}): "
            f"{'meets target' if ok else 'MISSES TARGET'}{why}"
        )
    return lines


# --- main ----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="50,200,500", help="closed-loop concurrencies, comma separated")
    parser.add_argument("--requests", type=int, default=6000, help="requests per closed-loop run")
    parser.add_argument("--max-seconds", type=float, default=8, help="cap on each closed-loop run")
    parser.add_argument(
        "--rates", default=str(TARGET_RATE), help="open-loop arrival rates, requests/s, comma separated"
    )
    parser.add_argument("--rate-seconds", type=float, default=10, help="length of each open-loop run")
    parser.add_argument("--modes", default="json,stream", help="json (non-streaming) and/or stream")
    parser.add_argument(
        "--client",
        choices=("python", "wrk"),
        default="python",
        help="closed-loop load generator (the open loop is always Python)",
    )
    parser.add_argument("--load-processes", type=int, default=1, help="Python load generator processes")
    parser.add_argument("--store", action="store_true", help='send "store": true (the router logs each call)')
    parser.add_argument(
        "--project-limit",
        type=int,
        default=2048,
        help="DISTILLERY_PROJECT_MAX_CONCURRENCY for the platform; 0 keeps its default (256)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (platform log) for inspection")
    parser.add_argument("--serve-upstream", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_upstream:
        serve_upstream(args.serve_upstream)
        return
    levels = [int(x) for x in args.levels.split(",") if x.strip()]
    rates = [float(x) for x in args.rates.split(",") if x.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if set(modes) - {"json", "stream"}:
        parser.error("--modes: json and/or stream")
    if args.client == "wrk" and not shutil.which("wrk"):
        parser.error("--client wrk: wrk is not installed")

    t_start = time.time()
    with Stack(args.keep, args.project_limit) as stack:
        stack.start_upstream()
        stack.start_router()
        machine = stack.machine
        idle0 = machine.snapshot()
        time.sleep(2)
        idle, _ = machine.busy(idle0)
        print(
            f"Distillery router overhead bench: {os.cpu_count()} CPUs shared by the load generator, the "
            f"platform (`distillery up`, pid {stack.up.pid}, with its Tansu child) and the instant "
            f"upstream (pid {stack.upstream.pid}); started in {time.time() - t_start:.1f} s"
        )
        print(
            f"  before load: platform {idle['platform']:.2f} cores, upstream {idle['upstream']:.2f}, "
            f"other processes {max(0.0, idle['machine'] - idle['platform'] - idle['upstream']):.2f} "
            f"(load average {os.getloadavg()[0]:.1f}); project concurrency limit "
            f"{args.project_limit or 'platform default'}"
        )
        print(f'  request body: {request_body(False, args.store).decode()}  (+ "stream":true when streaming)')

        def target(name: str, stream: bool) -> tuple[int, str, str, bytes]:
            body = request_body(stream, args.store)
            if name == "direct":
                return stack.upstream_port, DIRECT_PATH, OPENAI_KEY, body
            return stack.port, ROUTER_PATH, stack.key, body

        def closed(name: str, mode: str, conns: int, requests: int) -> Load:
            port, path, key, body = target(name, mode == "stream")
            if args.client == "wrk":
                return run_wrk(machine, mode, name, port, path, key, body, conns, args.max_seconds, stack.tmp)
            job = Job(port, build_request(port, path, key, body), "closed", conns, requests, args.max_seconds)
            return run_python(machine, mode, name, job, min(args.load_processes, conns))

        def open_(name: str, mode: str, rate: float) -> Load:
            port, path, key, body = target(name, mode == "stream")
            n = int(rate * args.rate_seconds)
            job = Job(port, build_request(port, path, key, body), "open", 16, n, args.rate_seconds, rate)
            load = run_python(machine, mode, name, job, 1)
            late = pct(load.late, 99) * 1000
            if late > 1:
                load.notes.append(f"the load generator sent late (p99 {late:.1f} ms behind schedule)")
            return load

        # 1. The upstream alone must be far faster than the router.
        print("\n[1] the instant upstream alone (closed loop, 50 connections)")
        for mode in modes:
            alone = closed("direct", mode, 50, args.requests)
            print(
                f"  {mode:<6}: {alone.rps:.0f} req/s, p50 {alone.ms(50):.2f} ms, p99 {alone.ms(99):.2f} ms; "
                f"cores: upstream {alone.cpu['upstream']:.2f}, client {alone.cpu['client']:.2f}, "
                f"other {other_cpu(alone.cpu):.2f}"
            )
            print_notes(alone)
        for mode in modes:  # warm the router up (first-use paths) on as many connections as the open loop
            closed("router", mode, 16, min(args.requests, 1000))

        # 2. Open loop at a fixed arrival rate: the target's own terms. First, so that the bursts
        # of the closed loop (which leave the router with many pooled upstream connections) do
        # not precede it.
        print(
            f"\n[2] open loop: requests arrive at a fixed rate for {args.rate_seconds:g} s whatever the "
            "answers (Python load generator, 1 process); times in ms, CPU/req = platform CPU per answer"
        )
        print(header("req/s"))
        summary: list[str] = []
        for rate in rates:
            for mode in modes:
                direct = open_("direct", mode, rate)
                router = open_("router", mode, rate)
                for line in rows(f"{rate:.0f}", direct, router):
                    print(line)
                print_notes(direct, router)
                if rate == TARGET_RATE or len(rates) == 1:
                    summary += headline(rate, mode, direct, router)

        # 3. Closed loop: every connection keeps one request in flight.
        print(
            f"\n[3] closed loop: N connections, each with one request in flight; {args.requests} requests "
            f"per run, at most {args.max_seconds:g} s; load generator: {args.client}; times in ms"
        )
        print(header("conns"))
        capacity: dict[str, float] = {}
        for conns in levels:
            for mode in modes:
                direct = closed("direct", mode, conns, args.requests)
                router = closed("router", mode, conns, args.requests)
                capacity[mode] = max(capacity.get(mode, 0.0), router.rps if router.rps == router.rps else 0.0)
                for line in rows(str(conns), direct, router):
                    print(line)
                print_notes(direct, router)

        print()
        for line in summary:
            print(line)
        if capacity:
            print(
                "router capacity on this machine (best closed-loop req/s): "
                + ", ".join(f"{mode} {rps:.0f}" for mode, rps in capacity.items())
            )
    print(f"\ntotal {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
