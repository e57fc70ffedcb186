"""Datasets benchmark: import-from-logs rows/s, JSONL upload MB/s, export MB/s.

    .venv/bin/python bench/datasets.py                    # 100k logs, about a minute
    .venv/bin/python bench/datasets.py --logs 1000000     # the full target (1M logs <= 60 s)

Starts a Tansu broker and ``distillery up`` in a separate process on a throw-away data dir
(chDB allows one data path per process, so this process never opens it), then measures
through the public surfaces only:

1. import from logs: ``--logs`` realistic 1-2 KB logs (the sample traffic, ~3 % failed calls)
   are published straight to ``logs.v1`` and waited for until ``GET /logs/count`` covers them;
   then ``POST /datasets/{id}/import-logs {}`` is timed until its job finishes (the api streams
   the logs from ingest's gRPC LogQuery and inserts entries in bulk). rows/s = entries
   created / seconds from the POST to the finished job.
2. upload: a JSONL of ``--upload-rows`` rows sent raw to ``POST /datasets/{id}/files``, timed
   until its job finishes (MB/s of the file).
3. export: ``POST /datasets/{id}/export`` of the imported dataset (a job, polled until done) plus
   the download of the file (MB/s of the file, from the POST to the last byte).

Upload and export print ``n/a`` when their routes are absent. Prints numbers and never asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from platform_stack import Http, PlatformStack, cpu_seconds, uuid7  # noqa: E402

API = "/api/v1"
TOPIC = "logs.v1"
TARGET_IMPORT_ROWS = 1_000_000
TARGET_IMPORT_SECONDS = 60.0
POOL_MAX = 20_000  # distinct sample bodies; longer runs cycle through them (log ids stay unique)
TERMINAL = ("succeeded", "partial", "failed")


def descendants(pid: int) -> list[int]:
    """``pid`` and every live process below it, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


# --- the stack under test ------------------------------------------------------------------------


class Stack(PlatformStack):
    """The shared stack with one bench project."""

    def __init__(self, keep: bool) -> None:
        super().__init__(keep, prefix="distillery-bench-datasets-")
        self.project_id = self.key = ""

    def start(self) -> None:
        self.start_broker()
        self.project_id, self.key = self.create_key("bench-datasets")
        self.start_platform()
        deadline = time.time() + 120
        self.http = Http(self.port, self.key)
        # the key reaches the platform over catalog.v1: wait until it is accepted
        while self.http.json("GET", f"{API}/logs/count")[0] == 401:
            if time.time() > deadline:
                raise RuntimeError("the bench key was never accepted")
            time.sleep(0.2)

    def platform_cpu(self) -> float:
        """The platform process and its children (the log-import worker processes)."""
        if self.up is None:
            return 0.0
        return sum(cpu_seconds(pid) for pid in descendants(self.up.pid))


# --- helpers over the API ------------------------------------------------------------------------


def create_dataset(stack: Stack, name: str) -> str:
    status, body = stack.http.json("POST", f"{API}/datasets", {"name": name})
    if status not in (200, 201):
        raise RuntimeError(f"POST /datasets -> {status}: {body}")
    return body["id"]


def wait_job(stack: Stack, dataset_id: str, job_id: str, timeout: float, interval: float = 0.25) -> dict:
    deadline = time.time() + timeout
    while True:
        status, job = stack.http.json("GET", f"{API}/datasets/{dataset_id}/jobs/{job_id}")
        if status != 200:
            raise RuntimeError(f"GET job -> {status}: {job}")
        if job["status"] in TERMINAL:
            return job
        if time.time() > deadline:
            raise RuntimeError(f"job {job_id} not finished after {timeout:.0f} s: {job}")
        time.sleep(interval)


def sample_events(project_id: str, n: int, seed: int) -> list[dict]:
    """Each sample report as a ``logs.v1`` event (the conversion ``POST /report`` does)."""
    from services.ingest.models import AnthropicReportRequest, ReportRequest
    from services.ingest.service import report_to_event
    from services.sample_traffic import ANTHROPIC_ROUTE, sample_reports

    events = []
    for route, body in sample_reports(min(n, POOL_MAX), seed=seed):
        anthropic = route == ANTHROPIC_ROUTE
        model = AnthropicReportRequest if anthropic else ReportRequest
        event = report_to_event(
            model.model_validate(body), project_id=project_id, source="anthropic" if anthropic else "openai"
        )
        events.append(event.model_dump(mode="json"))
    return events


async def publish(kafka_url: str, project_id: str, templates: list[dict], n: int) -> tuple[float, int]:
    """``n`` events with fresh, time-ordered log ids; returns (seconds until all acked, bytes)."""
    import orjson
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(
        bootstrap_servers=kafka_url,
        linger_ms=10,
        max_batch_size=1 << 20,
        max_request_size=16 << 20,
        enable_idempotence=False,
        acks="all",
    )
    await producer.start()
    key, total, futures = project_id.encode(), 0, []
    start = time.time()
    base_ms = int(start * 1000) - n  # one distinct millisecond per log, all in the past
    try:
        for i in range(n):
            event = {**templates[i % len(templates)], "log_id": uuid7(base_ms + i)}
            value = orjson.dumps(event)
            total += len(value)
            futures.append(await producer.send(TOPIC, value, key=key))
            if len(futures) >= 20_000:
                await asyncio.gather(*futures)
                futures.clear()
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return time.time() - start, total


def wait_count(stack: Stack, n: int, timeout: float) -> float:
    start, deadline = time.time(), time.time() + timeout
    last = -1
    while time.time() < deadline:
        status, body = stack.http.json("GET", f"{API}/logs/count")
        if status == 200:
            last = body["count"]
            if last >= n:
                return time.time() - start
        time.sleep(0.5)
    raise RuntimeError(f"only {last} of {n} logs queryable after {timeout:.0f} s:\n{stack.log_tail()}")


# --- phases --------------------------------------------------------------------------------------


def bench_import(stack: Stack, args: argparse.Namespace) -> str:
    templates = sample_events(stack.project_id, args.logs, args.seed)
    failed = sum(
        1 for e in templates if not (200 <= (e.get("status_code") or 0) < 300 and not e.get("error_message"))
    )
    print(
        f"\n[1] import from logs: {args.logs} logs ({failed / len(templates):.1%} failed calls in the sample)"
    )
    seconds, size = asyncio.run(publish(stack.tansu.url, stack.project_id, templates, args.logs))
    print(f"  published {args.logs} events ({size / args.logs:.0f} B mean) in {seconds:.1f} s")
    waited = wait_count(stack, args.logs, args.timeout)
    print(f"  all queryable {waited:.1f} s after the last ack")

    dataset_id = create_dataset(stack, "bench-import")
    cpu0, t0 = stack.platform_cpu(), time.time()
    status, job = stack.http.json("POST", f"{API}/datasets/{dataset_id}/import-logs", {"filters": {}})
    if status != 202:
        raise RuntimeError(f"POST import-logs -> {status}: {job}")
    job = wait_job(stack, dataset_id, job["id"], args.timeout)
    elapsed = time.time() - t0
    cpu = stack.platform_cpu() - cpu0
    result = job["result"]
    created = result.get("entries_created", 0)
    rate = created / max(elapsed, 1e-9)
    logs_rate = result.get("logs_read", 0) / max(elapsed, 1e-9)
    print(
        f"  job {job['status']} in {elapsed:.1f} s: {result}; "
        f"platform CPU {cpu / max(elapsed, 1e-9):.2f} cores"
    )
    projected = TARGET_IMPORT_ROWS / max(logs_rate, 1e-9)
    verdict = "meets target" if projected <= TARGET_IMPORT_SECONDS else "BELOW TARGET"
    print(
        f"  {logs_rate:.0f} logs read/s: 1M logs would take {projected:.0f} s "
        f"(target <= {TARGET_IMPORT_SECONDS:.0f} s: {verdict})"
    )
    print(f"import-from-logs: {rate:.0f} rows/s")

    t1 = time.time()
    status, again = stack.http.json("POST", f"{API}/datasets/{dataset_id}/import-logs", {"filters": {}})
    if status == 202:
        again = wait_job(stack, dataset_id, again["id"], args.timeout)
        print(
            f"  re-import (all duplicates) in {time.time() - t1:.1f} s: "
            f"{again['result'].get('skipped_duplicates', 0)} skipped"
        )
    return dataset_id


def unique_row(row: dict, i: int) -> dict:
    """``row`` made distinct (entries with the same content are deduplicated on upload)."""
    messages = [dict(m) for m in row["messages"]]
    first = next((m for m in messages if isinstance(m.get("content"), str)), None)
    if first is not None:
        first["content"] = f"{first['content']} [{i}]"
    else:
        messages.insert(0, {"role": "system", "content": f"[{i}]"})
    return {**row, "messages": messages, "metadata": {"bench": "upload", "i": str(i)}}


def bench_upload(stack: Stack, args: argparse.Namespace) -> None:
    from services.api.log_imports.convert import log_to_row
    from services.sample_traffic import sample_reports

    print(f"\n[2] upload: a JSONL of {args.upload_rows} rows")
    rows = []
    for _, body in sample_reports(min(args.upload_rows, POOL_MAX), seed=args.seed + 1):
        try:
            rows.append(log_to_row(body["reqPayload"], body["respPayload"], {}))
        except Exception:  # failed calls and Anthropic shapes: not training rows as reported
            continue
    lines = [json.dumps(unique_row(rows[i % len(rows)], i)) for i in range(args.upload_rows)]
    data = ("\n".join(lines) + "\n").encode()
    dataset_id = create_dataset(stack, "bench-upload")
    t0 = time.time()
    status, job = stack.http.request(
        "POST", f"{API}/datasets/{dataset_id}/files", data, content_type="application/jsonl"
    )
    if status in (404, 405):
        print("upload: n/a (no upload route)")
        return
    if status != 202:
        print(f"  POST /files -> {status}: {job[:300]!r}")
        print("upload: n/a")
        return
    accepted = time.time() - t0
    job = wait_job(stack, dataset_id, json.loads(job)["id"], args.timeout)
    elapsed = time.time() - t0
    mb = len(data) / 1e6
    print(
        f"  {mb:.1f} MB accepted in {accepted:.1f} s, job {job['status']} after {elapsed:.1f} s: "
        f"{job.get('result')}"
    )
    print(f"upload: {mb / max(elapsed, 1e-9):.1f} MB/s")


def bench_export(stack: Stack, dataset_id: str, timeout: float) -> None:
    print("\n[3] export of the imported dataset (a job, then the download)")
    t0, cpu0 = time.time(), stack.platform_cpu()
    status, raw = stack.http.request("POST", f"{API}/datasets/{dataset_id}/export", b"{}")
    if status in (404, 405):
        print("export: n/a (no export route)")
        return
    if status != 202:
        print(f"  POST /export -> {status}: {raw[:300]!r}")
        print("export: n/a")
        return
    job = wait_job(stack, dataset_id, json.loads(raw)["id"], timeout, interval=1.0)
    written, cpu = time.time() - t0, stack.platform_cpu() - cpu0
    if job["status"] != "succeeded":
        print(f"  export job {job['status']}: {job.get('errors')}")
        print("export: n/a")
        return
    export = job["result"]
    path = export.get("download") or ""
    status, data = stack.http.request("GET", path if path.startswith(API) else f"{API}{path}")
    elapsed = time.time() - t0
    if status != 200:
        print(f"  download -> {status}")
        print("export: n/a")
        return
    mb = len(data) / 1e6
    print(
        f"  {export.get('entry_count')} entries, {mb:.1f} MB: job done in {written:.1f} s "
        f"({mb / max(written, 1e-9):.1f} MB/s) on {cpu:.1f} platform CPU-seconds "
        f"({mb / max(cpu, 1e-9):.1f} MB per CPU-second), downloaded {elapsed - written:.1f} s later"
    )
    print(f"export: {mb / max(elapsed, 1e-9):.1f} MB/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logs", type=int, default=100_000, help="logs to generate and import")
    parser.add_argument("--upload-rows", type=int, default=100_000, help="rows in the uploaded JSONL")
    parser.add_argument("--timeout", type=float, default=900, help="max wait for any one phase")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--skip-upload", action="store_true")
    parser.add_argument("--skip-export", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the temp data dir (logs) for inspection")
    args = parser.parse_args()
    t_start = time.time()
    with Stack(args.keep) as stack:
        stack.start()
        print(
            f"Distillery datasets bench: {os.cpu_count()} CPUs; platform = 1 `distillery up` process "
            f"+ Tansu; started in {time.time() - t_start:.1f} s"
        )
        dataset_id = bench_import(stack, args)
        if args.skip_upload:
            print("upload: n/a (skipped)")
        else:
            bench_upload(stack, args)
        if args.skip_export:
            print("export: n/a (skipped)")
        else:
            bench_export(stack, dataset_id, args.timeout)
    print(f"\ntotal {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
