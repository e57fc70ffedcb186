"""Ingest benchmark: Kafka → ClickHouse and ``POST /report`` → queryable, with end-to-end lag.

    .venv/bin/python bench/ingest.py                             # defaults, about 2 minutes
    .venv/bin/python bench/ingest.py --logs 5000 --reports 2000  # quick run

Starts a Tansu broker and ``distillery up`` in a separate process on a throw-away data dir,
then measures through the public surfaces only (Kafka and HTTP; chDB allows one data path
per process, so this process never opens it). Logs are 1–2 KB, built from the sample traffic.

1. ``logs.v1`` straight to Kafka, a burst as fast as Kafka acks: logs/s until all are
   counted by ``GET /logs/count``.
2. ``logs.v1`` paced at the target rate: lag = when the count first covered a log − when it
   was sent.
3. ``POST /report`` (90 %) and ``/report-anthropic`` (10 %), many in flight, by ``wrk`` when
   installed, else by a few Python processes: accepted req/s, request latency, logs/s until
   all are queryable, lag from each 200 to queryable.

Prints numbers next to the targets; never asserts. Method and caveats: ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import platform_stack  # noqa: E402
from platform_stack import CLOCK_TICKS, PlatformStack, cpu_seconds, uuid7  # noqa: E402

API = "/api/v1"
TOPIC = "logs.v1"

TARGET_KAFKA_RATE = 20_000  # logs/s, Kafka → ClickHouse
TARGET_REPORT_RATE = 5_000  # /report per second per platform process
TARGET_P99_LAG = 2.0  # seconds

POOL_MAX = 20_000  # distinct sample bodies; longer runs cycle through them (log ids stay unique)


# --- small helpers -------------------------------------------------------------------------------


def machine_busy() -> float:
    """CPU seconds every process on the machine has used so far (all cores), from /proc/stat."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / CLOCK_TICKS


def self_cpu() -> float:
    t = os.times()
    return t.user + t.system


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def fmt_s(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds == seconds else "n/a"


class Http(platform_stack.Http):
    """The shared client plus the count every run polls."""

    def count(self) -> int:
        status, body = self.request("GET", f"{API}/logs/count")
        if status != 200:
            raise RuntimeError(f"GET /logs/count -> {status}: {body[:300]!r}")
        return int(json.loads(body)["count"])


# --- the count poller (its own process, so timestamps do not wait on the load generator) --------


def _poll_counts(port: int, key: str, target, interval: float, stop, out) -> None:
    """Poll until the count reaches ``target`` (a shared value the parent may lower) or ``stop`` is set."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    client = Http(port, key)
    samples: list[tuple[float, int]] = []  # (time the answer arrived, count)
    query_s: list[float] = []
    error = None
    try:
        while not stop.is_set():
            started = time.time()
            value = client.count()
            now = time.time()
            samples.append((now, value))
            query_s.append(now - started)
            if value >= target.value:
                break
            time.sleep(max(0.0, interval - (time.time() - started)))
    except Exception as exc:  # reported by the parent
        error = f"{type(exc).__name__}: {exc}"
    t = os.times()
    out.send({"samples": samples, "query_s": query_s, "error": error, "cpu": t.user + t.system})
    out.close()


class Poller:
    """``GET /logs/count`` every ``interval`` seconds in its own process, timestamping each answer."""

    def __init__(self, port: int, key: str, target: int, interval: float) -> None:
        ctx = mp.get_context("spawn")
        self.stop = ctx.Event()
        self.target = ctx.Value("q", target)
        self.recv, send = ctx.Pipe(duplex=False)
        self.process = ctx.Process(
            target=_poll_counts, args=(port, key, self.target, interval, self.stop, send), daemon=True
        )
        self.process.start()

    def retarget(self, target: int) -> None:
        self.target.value = target

    def result(self, timeout: float) -> dict:
        """The samples, once the target is reached or after ``timeout`` seconds."""
        if not self.recv.poll(timeout):
            self.stop.set()
            self.recv.poll(30)
        data = self.recv.recv()
        self.process.join(5)
        return data


def first_seen(samples: list[tuple[float, int]], baseline: int, n: int) -> list[float | None]:
    """For k = 0..n-1: when the count first covered the (k+1)-th log of this run."""
    seen: list[float | None] = [None] * n
    k = 0
    for t, value in samples:
        covered = min(n, value - baseline)
        while k < covered:
            seen[k] = t
            k += 1
    return seen


def lags(sent: list[float], seen: list[float | None]) -> list[float]:
    return [s - t for t, s in zip(sent, seen, strict=False) if s is not None]


# --- sample payloads -----------------------------------------------------------------------------


def sample_bodies(n: int, seed: int) -> list[tuple[str, dict]]:
    from services.sample_traffic import sample_reports

    return sample_reports(min(n, POOL_MAX), seed=seed, now_ms=int(time.time() * 1000) - n * 1000)


def event_templates(project_id: str, reports: list[tuple[str, dict]]) -> list[tuple[dict, int]]:
    """Each report body as a ``logs.v1`` event (the conversion ``POST /report`` does) and its latency."""
    from services.ingest.models import AnthropicReportRequest, ReportRequest
    from services.ingest.service import report_to_event
    from services.sample_traffic import ANTHROPIC_ROUTE

    templates = []
    for route, body in reports:
        anthropic = route == ANTHROPIC_ROUTE
        model = AnthropicReportRequest if anthropic else ReportRequest
        event = report_to_event(
            model.model_validate(body), project_id=project_id, source="anthropic" if anthropic else "openai"
        )
        templates.append((event.model_dump(mode="json"), event.received_at - event.requested_at))
    return templates


# --- phase 1: straight to Kafka ------------------------------------------------------------------


@dataclass
class Published:
    sent: list[float]  # wall time each event was handed to the producer
    first_send: float
    acked: float  # when the last ack arrived
    bytes_mean: float


async def publish(
    kafka_url: str,
    project_id: str,
    templates: list[tuple[dict, int]],
    n: int,
    rate: float | None,
    cap_s: float,
) -> Published:
    """Send ``n`` events (unique log ids, received_at = send time) as fast as allowed; wait for every ack.

    The producer is librdkafka (``confluent-kafka``): it costs a few µs of CPU per event where
    aiokafka's pure-Python producer costs ~30 µs, which on a small machine would come out of
    what the platform under test gets.
    """
    import orjson
    from confluent_kafka import KafkaException, Producer

    producer = Producer(
        {
            "bootstrap.servers": kafka_url,
            "linger.ms": 10,
            "batch.size": 1 << 20,
            "message.max.bytes": 16 << 20,
            "enable.idempotence": False,
            "acks": "all",
            "queue.buffering.max.messages": max(100_000, n),
            "queue.buffering.max.kbytes": 4 << 20,
        }
    )
    key = project_id.encode()
    sent: list[float] = []
    errors: list[str] = []
    total_bytes = 0

    def delivered(err, _msg) -> None:
        if err is not None:
            errors.append(str(err))

    def value(i: int, now: float) -> bytes:
        template, latency_ms = templates[i % len(templates)]
        now_ms = int(now * 1000)
        event = {
            **template,
            "log_id": uuid7(now_ms),
            "requested_at": now_ms - latency_ms,
            "received_at": now_ms,
        }
        return orjson.dumps(event)

    # A burst is serialized before the clock starts (timestamps = now): on a small machine the
    # publisher's own CPU would otherwise come out of what the platform gets.
    ready = [value(i, time.time()) for i in range(n)] if rate is None else None
    start = time.time()
    for i in range(n):
        if rate:
            ahead = (i / rate) - (time.time() - start)
            if ahead > 0.002:
                await asyncio.sleep(ahead)
        if time.time() - start > cap_s:
            break
        now = time.time()
        data = ready[i] if ready is not None else value(i, now)
        total_bytes += len(data)
        sent.append(now)
        producer.produce(TOPIC, data, key=key, on_delivery=delivered)
        if i % 1000 == 0:
            producer.poll(0)
    left = await asyncio.to_thread(producer.flush, cap_s + 60)
    acked = time.time()
    if left or errors:
        raise KafkaException(f"{left} events unacknowledged, {len(errors)} failed: {errors[:3]}")
    return Published(sent, sent[0] if sent else time.time(), acked, total_bytes / max(1, len(sent)))


@dataclass
class KafkaRun:
    label: str
    published: Published
    queryable: int
    done_at: float | None
    lags: list[float]
    query_s: list[float]
    cpu: dict[str, float]
    wall: float
    error: str | None = None
    backlog_at_ack: int = 0  # logs acked by Kafka but not yet queryable when the last ack arrived

    @property
    def drain_rate(self) -> float | None:
        """Queryable logs/s from the last ack on, while the publisher no longer competes for CPU."""
        if self.done_at is None or self.backlog_at_ack < max(1000, self.n // 10):
            return None
        return self.backlog_at_ack / max(1e-9, self.done_at - self.published.acked)

    @property
    def n(self) -> int:
        return len(self.published.sent)

    @property
    def rate(self) -> float:
        end = self.done_at or time.time()
        return self.queryable / max(1e-9, end - self.published.first_send)


def kafka_run(stack: Stack, label: str, templates, n: int, rate: float | None, args) -> KafkaRun:
    baseline = stack.kafka_http.count()
    poller = Poller(stack.port, stack.kafka_key, baseline + n, interval=args.poll)
    time.sleep(0.3)  # let the poller start
    cpu0 = stack.cpu()
    t0 = time.time()
    published = asyncio.run(
        publish(stack.kafka_url, stack.kafka_project, templates, n, rate, cap_s=args.seconds or 1e9)
    )
    poller.retarget(baseline + len(published.sent))
    result = poller.result(args.timeout)
    samples = result["samples"]
    sent_n = len(published.sent)
    final = (samples[-1][1] - baseline) if samples else 0
    seen = first_seen(samples, baseline, sent_n)
    done_at = seen[-1] if seen and seen[-1] is not None else None
    cpu = stack.cpu_since(cpu0)
    cpu["poller"] = result.get("cpu", 0.0)
    at_ack = next((value for t, value in samples if t >= published.acked), samples[-1][1] if samples else 0)
    return KafkaRun(
        label,
        published,
        min(final, sent_n),
        done_at,
        lags(published.sent, seen),
        result["query_s"],
        cpu,
        (done_at or time.time()) - t0,
        result["error"],
        sent_n - min(sent_n, at_ack - baseline),
    )


# --- phase 2: POST /report -----------------------------------------------------------------------

WRK_SCRIPT = r"""
-- Sends exactly `total` requests across all threads, cycling through pre-built bodies.
-- Prints "P <thread> <responses> <non200>" every `every` responses and "D <thread>" when done.
local reqs, idx, quota, reserved, responses, non200, every = {}, 0, 0, 0, 0, 0, 100

function setup(thread)
  nthread = (nthread or 0) + 1
  thread:set("tid", nthread)
end

function init(args)
  local path, key, total, nthreads = args[1], args[2], tonumber(args[3]), tonumber(args[4])
  every = tonumber(args[5])
  quota = math.floor(total / nthreads)
  if tid <= total % nthreads then quota = quota + 1 end
  local headers = {["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. key}
  for line in io.lines(path) do
    local route, body = line:match("^(%S+)\t(.*)$")
    reqs[#reqs + 1] = wrk.format("POST", "/api/v1" .. route, headers, body)
  end
  idx = ((tid - 1) * 7919) % #reqs
  if quota == 0 then io.stdout:write(string.format("D %d\n", tid)); io.stdout:flush() end
end

function delay()
  if reserved < quota then reserved = reserved + 1; return 0 end
  return 3600000  -- quota sent: park the connection until the run is stopped
end

function request()
  idx = idx % #reqs + 1
  return reqs[idx]
end

function response(status, headers, body)
  responses = responses + 1
  if status ~= 200 then non200 = non200 + 1 end
  if responses % every == 0 or responses == quota then
    io.stdout:write(string.format("P %d %d %d\n", tid, responses, non200)); io.stdout:flush()
  end
  if responses == quota then io.stdout:write(string.format("D %d\n", tid)); io.stdout:flush() end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.stdout:write(string.format("S %d %d %d %d %d %d %d %d %d\n", summary.requests,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
  io.stdout:flush()
end
"""


@dataclass
class LoadResult:
    client: str
    accepted: int  # 200s
    non200: int
    errors: int
    started: float
    last_response: float
    accepted_times: list[float]  # wall time of the k-th 200 (approximate for wrk: progress lines)
    latency_p50: float
    latency_p99: float
    latency_max: float
    client_cpu: float
    notes: list[str] = field(default_factory=list)


def run_wrk(stack: Stack, pool_path: Path, total: int, concurrency: int, cap_s: float, stall_s: float):
    threads = 2 if concurrency >= 2 else 1
    script = stack.tmp / "report.lua"
    script.write_text(WRK_SCRIPT)
    every = 10  # a progress line per 10 responses per thread: acceptance times to a few ms
    cmd = [
        "wrk",
        f"-t{threads}",
        f"-c{max(concurrency, threads)}",
        f"-d{int(cap_s) if cap_s < 1e8 else 3600}s",
        "--timeout",
        "60s",
        "-s",
        str(script),
        f"http://127.0.0.1:{stack.port}",
        "--",
        str(pool_path),
        stack.report_key,
        str(total),
        str(threads),
        str(every),
    ]
    started = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    progress: dict[int, tuple[int, int]] = {}
    curve: list[tuple[float, int]] = []  # (time read, total responses so far, all threads)
    finished: set[int] = set()
    summary: list[int] | None = None
    other: list[str] = []
    last_progress = time.time()
    lock = threading.Lock()
    all_done = threading.Event()

    def reader() -> None:
        nonlocal summary, last_progress
        assert proc.stdout is not None
        for line in proc.stdout:
            now = time.time()
            parts = line.split()
            with lock:
                if parts[:1] == ["P"]:
                    progress[int(parts[1])] = (int(parts[2]), int(parts[3]))
                    curve.append((now, sum(r for r, _ in progress.values())))
                    last_progress = now
                elif parts[:1] == ["D"]:
                    finished.add(int(parts[1]))
                    if len(finished) == threads:
                        all_done.set()
                elif parts[:1] == ["S"]:
                    summary = [int(x) for x in parts[1:]]
                else:
                    other.append(line.rstrip())
        all_done.set()

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    cpu_pid = proc.pid
    cpu_wrk = 0.0
    while not all_done.wait(0.2):
        cpu_wrk = max(cpu_wrk, cpu_seconds(cpu_pid))
        if time.time() - last_progress > stall_s:
            break
    cpu_wrk = max(cpu_wrk, cpu_seconds(cpu_pid))
    done_at = curve[-1][0] if curve else time.time()
    ended_by_itself = proc.poll() is not None  # -d elapsed (--seconds) or wrk failed
    if not ended_by_itself:
        proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    thread.join(5)
    responses = sum(r for r, _ in progress.values())
    non200 = sum(b for _, b in progress.values())
    errors = 0
    if summary:  # S requests connect read write status timeout p50 p99 max
        responses, non200 = max(responses, summary[0]), max(non200, summary[4])
        errors = summary[1] + summary[2] + summary[3] + summary[5]
    accepted_times = expand_curve(curve, responses - non200)
    notes = [
        line for line in other if line and not line.startswith(("Running", "  ", "Requests/sec", "Transfer"))
    ]
    if len(finished) < threads and ended_by_itself and summary:
        notes.append(f"stopped by --seconds after {responses} of {total} requests")
    elif len(finished) < threads:
        notes.append(f"wrk stopped: {responses} of {total} responses, {stall_s:.0f}s without progress")
    return LoadResult(
        "wrk",
        responses - non200,
        non200,
        errors,
        started,
        done_at,
        accepted_times,
        (summary[6] / 1e6) if summary else float("nan"),
        (summary[7] / 1e6) if summary else float("nan"),
        (summary[8] / 1e6) if summary else float("nan"),
        cpu_wrk,
        notes,
    )


def expand_curve(curve: list[tuple[float, int]], total: int) -> list[float]:
    """Progress lines (time, cumulative responses) → the time of the k-th response (upper bound)."""
    times: list[float] = []
    for t, cumulative in curve:
        while len(times) < min(cumulative, total):
            times.append(t)
    return times


def _load_worker(
    port: int, key: str, pool_path: str, quota: int, conns: int, offset: int, cap_s: float, ready, go, out
):
    """One Python load process: ``conns`` keep-alive connections sending pre-built requests."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    requests = []
    with open(pool_path, "rb") as f:
        for line in f:
            route, body = line.rstrip(b"\n").split(b"\t", 1)
            head = (
                f"POST {API}{route.decode()} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            ).encode()
            requests.append(head + body)
    latencies: list[float] = []
    accepted_times: list[float] = []
    counts = {"ok": 0, "non200": 0, "errors": 0}
    state = {"next": offset, "left": quota}

    async def connection(deadline: float) -> None:
        reader = writer = None
        while state["left"] > 0 and time.time() < deadline:
            state["left"] -= 1
            request = requests[state["next"] % len(requests)]
            state["next"] += 1
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                t0 = time.perf_counter()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head[9:12])
                match = re.search(rb"(?i)content-length:\s*(\d+)", head)
                await reader.readexactly(int(match.group(1)) if match else 0)
                now = time.time()
                latencies.append(time.perf_counter() - t0)
                if status == 200:
                    counts["ok"] += 1
                    accepted_times.append(now)
                else:
                    counts["non200"] += 1
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
                counts["errors"] += 1
                if writer is not None:
                    writer.close()
                reader = writer = None
        if writer is not None:
            writer.close()

    async def main() -> None:
        ready.set()
        await asyncio.to_thread(go.wait)
        deadline = time.time() + cap_s
        await asyncio.gather(*(connection(deadline) for _ in range(conns)))

    asyncio.run(main())
    t = os.times()
    out.send(
        {
            "latencies": latencies,
            "accepted_times": accepted_times,
            "counts": counts,
            "cpu": t.user + t.system,
        }
    )
    out.close()


def run_python_load(
    stack: Stack, pool_path: Path, total: int, concurrency: int, cap_s: float, processes: int
):
    ctx = mp.get_context("spawn")
    go = ctx.Event()
    workers = []
    for w in range(processes):
        quota = total // processes + (1 if w < total % processes else 0)
        conns = max(1, concurrency // processes)
        ready = ctx.Event()
        recv, send = ctx.Pipe(duplex=False)
        p = ctx.Process(
            target=_load_worker,
            args=(
                stack.port,
                stack.report_key,
                str(pool_path),
                quota,
                conns,
                w * 7919,
                cap_s,
                ready,
                go,
                send,
            ),
            daemon=True,
        )
        p.start()
        workers.append((p, ready, recv))
    for _, ready, _ in workers:
        ready.wait(60)
    started = time.time()
    go.set()
    results = []
    for p, _, recv in workers:
        if recv.poll(min(cap_s, 3600) + 120):
            results.append(recv.recv())
        else:
            p.terminate()
        p.join(10)
    if not results:
        raise RuntimeError("the Python load generator processes returned nothing")
    latencies = [x for r in results for x in r["latencies"]]
    accepted_times = sorted(x for r in results for x in r["accepted_times"])
    ok = sum(r["counts"]["ok"] for r in results)
    return LoadResult(
        f"python ({processes} processes)",
        ok,
        sum(r["counts"]["non200"] for r in results),
        sum(r["counts"]["errors"] for r in results),
        started,
        accepted_times[-1] if accepted_times else time.time(),
        accepted_times,
        pct(latencies, 50),
        pct(latencies, 99),
        max(latencies) if latencies else float("nan"),
        sum(r["cpu"] for r in results),
    )


@dataclass
class ReportRun:
    load: LoadResult
    queryable: int
    done_at: float | None
    lags: list[float]
    query_s: list[float]
    cpu: dict[str, float]
    error: str | None


def report_run(stack: Stack, pool_path: Path, args) -> ReportRun:
    baseline = stack.report_http.count()
    poller = Poller(stack.port, stack.report_key, baseline + args.reports, interval=args.poll)
    time.sleep(0.3)
    cpu0 = stack.cpu()
    cap_s = args.seconds or 1e9
    use_wrk = args.client == "wrk" or (args.client == "auto" and shutil.which("wrk"))
    if use_wrk:
        load = run_wrk(stack, pool_path, args.reports, args.concurrency, cap_s, stall_s=30)
    else:
        load = run_python_load(stack, pool_path, args.reports, args.concurrency, cap_s, args.load_processes)
    cpu_load = stack.cpu_since(cpu0)
    poller.retarget(baseline + load.accepted)  # only 200s were promised to be recorded
    result = poller.result(args.timeout)
    samples = result["samples"]
    final = (samples[-1][1] - baseline) if samples else 0
    seen = first_seen(samples, baseline, load.accepted)
    done_at = seen[-1] if seen and seen[-1] is not None else None
    cpu = stack.cpu_since(cpu0)
    cpu["load generator"] = load.client_cpu
    cpu["poller"] = result.get("cpu", 0.0)
    cpu["load-phase wall"] = cpu_load["wall"]
    return ReportRun(
        load,
        min(final, load.accepted),
        done_at,
        lags(load.accepted_times, seen),
        result["query_s"],
        cpu,
        result["error"],
    )


# --- the stack under test ------------------------------------------------------------------------


class Stack(PlatformStack):
    """The shared stack with two bench projects: one fed through Kafka, one through /report.

    ``durable`` (the default profile of ``distillery up``): Tansu keeps its log in an embedded
    SeaweedFS (S3 storage engine), so what it acknowledged survives a crash; else in memory."""

    durable = True
    s3 = None

    def start_broker(self) -> None:
        if not self.durable:
            super().start_broker()
            return
        from services.common.embedded_s3 import EmbeddedS3
        from services.common.kafka import TansuBroker, free_port

        self.data_dir.mkdir(parents=True)
        self.s3 = EmbeddedS3(self.tmp / "s3")
        self.s3.start()
        self.tansu = TansuBroker.on_s3(self.s3, free_port(), self.tmp / "tansu.log")
        self.tansu.start()

    def stop(self) -> None:
        super().stop()
        if self.s3 is not None:
            self.s3.stop()

    def start(self) -> None:
        self.start_broker()
        self.kafka_project, self.kafka_key = self.create_key("bench-kafka")
        self.report_project, self.report_key = self.create_key("bench-report")
        self.start_platform()
        self.kafka_http = Http(self.port, self.kafka_key)
        self.report_http = Http(self.port, self.report_key)

    def warm_up(self, body: dict, timeout: float = 90) -> float:
        """One report through the whole path: the key is known and the writer's consumer group has formed."""
        t0 = time.time()
        status, text = self.report_http.request("POST", f"{API}/report", json.dumps(body).encode())
        if status != 200:
            raise RuntimeError(f"warm-up POST /report -> {status}: {text[:500]!r}")
        while self.report_http.count() < 1:
            if time.time() - t0 > timeout:
                raise RuntimeError(f"warm-up log not queryable after {timeout}s:\n{self.log_tail()}")
            time.sleep(0.1)
        return time.time() - t0

    def cpu(self) -> dict[str, float]:
        return {
            "platform": cpu_seconds(self.up.pid if self.up else None),
            # the broker with its storage (SeaweedFS) in the durable profile
            "tansu": cpu_seconds(self.tansu.process.pid if self.tansu and self.tansu.process else None)
            + cpu_seconds(self.s3.pid if self.s3 else None),
            "bench": self_cpu(),
            "machine": machine_busy(),
            "wall": time.time(),
        }

    def cpu_since(self, before: dict[str, float]) -> dict[str, float]:
        now = self.cpu()
        return {k: now[k] - before[k] for k in now}


# --- report --------------------------------------------------------------------------------------


OURS = ("platform", "tansu", "bench", "load generator", "poller")


def cpu_line(cpu: dict[str, float]) -> str:
    """Cores each process kept busy, and how much CPU the rest of the machine took meanwhile."""
    wall = max(1e-9, cpu["wall"])
    parts = [f"{name} {cpu[name] / wall:.2f}" for name in OURS if name in cpu]
    others = max(0.0, cpu["machine"] - sum(cpu.get(name, 0.0) for name in OURS)) / wall
    line = f"  CPU cores busy over {wall:.1f} s: " + ", ".join(parts) + f"; other processes {others:.2f}"
    line += f" (of {os.cpu_count()})"
    if others > 0.25:
        line += "\n  NOTE: other processes competed for the CPUs: these numbers understate the platform"
    return line


def cost_line(platform_cpu: float, logs: int) -> str:
    """CPU per log barely depends on what else runs on the machine, unlike logs/s."""
    if logs <= 0 or platform_cpu <= 0:
        return "  platform CPU per log: n/a"
    per_log = platform_cpu / logs
    return (
        f"  platform CPU per log: {per_log * 1e6:.0f} us, i.e. {1 / per_log:.0f} logs/s per core it gets "
        "(its Python event loop uses at most one)"
    )


def lag_text(values: list[float]) -> str:
    top = max(values) if values else float("nan")
    return f"p50 {fmt_s(pct(values, 50))}, p99 {fmt_s(pct(values, 99))}, max {fmt_s(top)}"


def poll_text(query_s: list[float]) -> str:
    p50, p99 = pct(query_s, 50) * 1000, pct(query_s, 99) * 1000
    return f"  /logs/count polls: {len(query_s)}, answered in p50 {p50:.0f} ms, p99 {p99:.0f} ms"


def print_kafka(run: KafkaRun) -> None:
    p = run.published
    publish_s = max(1e-9, p.acked - p.first_send)
    to_queryable = fmt_s((run.done_at or time.time()) - p.first_send)
    print(
        f"  published {run.n} events (mean {p.bytes_mean:.0f} B) in {publish_s:.2f} s "
        f"({run.n / publish_s:.0f}/s acked); {run.queryable} queryable {to_queryable} after the first send"
    )
    print(f"  throughput {run.rate:.0f} logs/s; lag send -> queryable {lag_text(run.lags)}")
    if run.drain_rate is not None:
        print(
            f"  {run.backlog_at_ack} logs were not yet queryable at the last ack; the writer then drained "
            f"{run.drain_rate:.0f} logs/s with the publisher idle"
        )
    print(poll_text(run.query_s))
    print(cpu_line(run.cpu))
    print(cost_line(run.cpu["platform"], run.queryable))
    if run.queryable < run.n:
        print(f"  WARNING: only {run.queryable} of {run.n} logs became queryable within --timeout")
    if run.error:
        print(f"  poller error: {run.error}")


@dataclass
class ReportRates:
    accepted: float  # 200s per second while sending
    queryable: float  # logs per second, first request -> all queryable


def print_report(run: ReportRun) -> ReportRates:
    load = run.load
    accept_s = max(1e-9, load.last_response - load.started)
    rates = ReportRates(
        load.accepted / accept_s, run.queryable / max(1e-9, (run.done_at or time.time()) - load.started)
    )
    print(
        f"  client {load.client}: {load.accepted} accepted (200), {load.non200} non-200, "
        f"{load.errors} connection errors in {accept_s:.2f} s = {rates.accepted:.0f} req/s"
    )
    print(
        f"  request latency p50 {load.latency_p50 * 1000:.1f} ms, p99 {load.latency_p99 * 1000:.1f} ms, "
        f"max {load.latency_max * 1000:.1f} ms"
    )
    print(f"  all queryable at {rates.queryable:.0f} logs/s; lag 200 -> queryable {lag_text(run.lags)}")
    print(poll_text(run.query_s))
    cpu = dict(run.cpu)
    load_wall = max(1e-9, cpu.pop("load-phase wall"))
    print(cpu_line(cpu) + f"\n  load generator while sending: {cpu['load generator'] / load_wall:.2f} cores")
    print(cost_line(cpu["platform"], run.queryable))
    for note in load.notes:
        print(f"  note: {note}")
    if run.queryable < load.accepted:
        print(f"  WARNING: only {run.queryable} of {load.accepted} accepted logs became queryable in time")
    if run.error:
        print(f"  poller error: {run.error}")
    return rates


def verdict(ok: bool) -> str:
    return "ok" if ok else "BELOW TARGET"


def print_summary(
    burst: KafkaRun | None, paced: KafkaRun | None, report: ReportRun | None, rates: ReportRates | None
) -> None:
    print("\nsummary (targets from the issue; one `distillery up` process on this machine):")
    if burst is not None:
        ok = burst.rate >= TARGET_KAFKA_RATE
        print(f"kafka->clickhouse: {burst.rate:.0f} logs/s    target >= {TARGET_KAFKA_RATE}: {verdict(ok)}")
    if paced is not None:
        p99 = pct(paced.lags, 99)
        print(
            f"kafka->clickhouse lag at {paced.label}: {lag_text(paced.lags)}    "
            f"target p99 <= {TARGET_P99_LAG:.0f} s: {verdict(p99 <= TARGET_P99_LAG)}"
        )
    if report is not None and rates is not None:
        ok = rates.queryable >= TARGET_REPORT_RATE
        print(
            f"report->queryable: {rates.queryable:.0f} logs/s    "
            f"target >= {TARGET_REPORT_RATE}: {verdict(ok)}"
        )
        ok = rates.accepted >= TARGET_REPORT_RATE
        print(
            f"report accepted: {rates.accepted:.0f} req/s per process    "
            f"target >= {TARGET_REPORT_RATE}: {verdict(ok)}"
        )
        p99 = pct(report.lags, 99)
        print(
            f"report lag 200 -> queryable: {lag_text(report.lags)}    "
            f"target p99 <= {TARGET_P99_LAG:.0f} s: {verdict(p99 <= TARGET_P99_LAG)}"
        )


@dataclass
class Startup:
    cold: float  # launch -> first /report answered, on an empty data dir
    warm: float  # the same on a restart of that data dir
    stop: float  # SIGINT -> process gone (drained, broker and S3 stopped)


def measure_startup(durable: bool) -> Startup:
    """``distillery up`` with its own embedded broker (and S3), as a user runs it: seconds from
    launch until ``POST /report`` is answered (401 without a key), twice, and the clean stop."""
    from services.common.kafka import free_port

    tmp = Path(tempfile.mkdtemp(prefix="distillery-startup-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILLERY_")}
    env["DISTILLERY_EMBEDDED_KAFKA_STORAGE"] = "s3" if durable else "memory"
    times, stop_s = [], 0.0
    try:
        for _ in range(2):
            port = free_port()
            command = [sys.executable, "-m", "services.cli", "up", "--port", str(port)]
            command += ["--grpc-port", str(free_port()), "--data-dir", str(tmp / "data")]
            launched = time.time()
            up = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            http = platform_stack.Http(port, timeout=2)
            while True:
                try:
                    if http.request("POST", f"{API}/report", b"{}")[0] == 401:
                        break
                except OSError:
                    pass
                if up.poll() is not None or time.time() - launched > 120:
                    raise RuntimeError("`distillery up` did not start")
                time.sleep(0.02)
            times.append(time.time() - launched)
            http.close()
            stopping = time.time()
            up.send_signal(signal.SIGINT)
            up.wait(60)
            stop_s = time.time() - stopping
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Startup(times[0], times[1], stop_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logs", type=int, default=100_000, help="events in the Kafka burst run")
    parser.add_argument("--paced-logs", type=int, help="events in the paced lag run (default: --logs / 2)")
    parser.add_argument("--rate", type=float, default=TARGET_KAFKA_RATE, help="pace of the lag run, events/s")
    parser.add_argument("--reports", type=int, default=50_000, help="POST /report calls")
    parser.add_argument("--seconds", type=float, help="stop sending in each run after this long")
    parser.add_argument("--concurrency", type=int, default=200, help="/report requests in flight")
    parser.add_argument("--client", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument("--load-processes", type=int, default=2, help="Python load generator processes")
    parser.add_argument("--timeout", type=float, default=120, help="max wait for a run to become queryable")
    parser.add_argument("--poll", type=float, default=0.25, help="/logs/count poll interval, seconds")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--keep", action="store_true", help="keep the temp data dir (logs) for inspection")
    parser.add_argument(
        "--profile",
        choices=("durable", "memory"),
        default="durable",
        help="Tansu storage: durable = S3 engine on an embedded SeaweedFS (the `up` default), or memory",
    )
    parser.add_argument("--no-startup", action="store_true", help="skip the start-up time measurement")
    args = parser.parse_args()
    # Clean up (stop `up` and Tansu, remove the temp dir) on Ctrl-C and on SIGTERM, even when
    # started in the background, where SIGINT arrives ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    n_paced = args.paced_logs if args.paced_logs is not None else args.logs // 2

    t_start = time.time()
    reports = sample_bodies(max(args.logs, n_paced, args.reports, 1), args.seed)
    sizes = [len(json.dumps(body)) for _, body in reports]
    burst = paced = report = rates = None
    startup = None if args.no_startup else measure_startup(args.profile == "durable")
    Stack.durable = args.profile == "durable"
    with Stack(args.keep) as stack:
        stack.start()
        pool_path = stack.tmp / "reports.tsv"
        with open(pool_path, "w") as f:
            for route, body in reports:
                f.write(f"{route}\t{json.dumps(body)}\n")
        templates = event_templates(stack.kafka_project, reports)
        warm = stack.warm_up(reports[0][1])
        load1, _, _ = os.getloadavg()
        print(
            f"Distillery ingest bench: {os.cpu_count()} CPUs (load average {load1:.1f}); platform = one "
            f"`distillery up` process + Tansu ({args.profile} profile), up in {time.time() - t_start:.1f} s; "
            f"first log queryable {warm:.1f} s after its report"
        )
        within = sum(1000 <= s <= 2048 for s in sizes) / len(sizes)
        print(
            f"sample logs: {len(reports)} distinct bodies of {min(sizes)}-{max(sizes)} B, "
            f"mean {statistics.mean(sizes):.0f} B ({within:.0%} within 1-2 KB)"
        )
        if args.logs > 0:
            print(f"\n[1] logs.v1 straight to Kafka -> ClickHouse: burst of {args.logs}, as fast as acked")
            burst = kafka_run(stack, "burst", templates, args.logs, None, args)
            print_kafka(burst)
        if n_paced > 0:
            print(f"\n[2] logs.v1 paced at {args.rate:.0f}/s: {n_paced} events")
            paced = kafka_run(stack, f"{args.rate:.0f}/s", templates, n_paced, args.rate, args)
            print_kafka(paced)
        if args.reports > 0:
            print(f"\n[3] POST /report -> queryable: {args.reports} calls, {args.concurrency} in flight")
            report = report_run(stack, pool_path, args)
            rates = print_report(report)
    print_summary(burst, paced, report, rates)
    if startup is not None:
        print(
            f"start-up ({args.profile}): launch -> /report answered {startup.cold:.1f} s on an empty "
            f"data dir, {startup.warm:.1f} s on a restart; Ctrl-C -> stopped {startup.stop:.1f} s    "
            f"target <= 3 s: {verdict(max(startup.cold, startup.warm) <= 3.0)}"
        )
    print(f"\ntotal {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
