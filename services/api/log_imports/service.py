"""Importing request logs into a dataset, server-side and in bulk.

Only ingest reads ClickHouse, so the api streams the matching logs from ingest's gRPC
``LogQuery.SearchBatches`` (what ``Search`` streams, ``SEARCH_BATCH_LOGS`` logs per message) as
an internal caller: ``x-distillery-internal-token`` plus the project id in
``x-distillery-project``, which decides whose logs are read. Each successful call becomes an
entry: the request's messages followed by ``choices[0].message`` as the output, the request's
``tools``/``tool_choice``/``response_format``, the log's metadata, ``source``/``provenance``
``request_log`` and ``source_log_id`` = the log id. Failed and pending calls are skipped; a log
already in the dataset is skipped as a duplicate (``datasets.service.insert_entries``: the unique
``(dataset_id, source_log_id)``), which makes re-importing idempotent, concurrent imports included.

Throughput: each message of the stream is converted into ready-to-insert rows by a small pool
of worker processes (JSON parsing and row validation are CPU-bound; the api's event loop keeps
streaming and inserting meanwhile), then inserted with multi-row statements,
``ROWS_PER_TRANSACTION`` rows per transaction, each committing the job's progress with it.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import grpc
import orjson
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.api.datasets import jobs
from services.api.datasets.bulk import PLACEHOLDER_MOMENT, EntryRow, driver_moment, entry_row
from services.api.datasets.models import Dataset, DatasetJob
from services.api.datasets.rows import EntryDraft, EntryError, parse_entry
from services.api.datasets.service import (
    draft_values,
    entry_ids,
    get_dataset,
    insert_entries,
)
from services.api.log_imports.models import JOB_KIND, SOURCE, ImportFilters, ImportLogsRequest
from services.common import tracing
from services.common.auth import INTERNAL_TOKEN_HEADER, PROJECT_HEADER
from services.common.clock import now
from services.common.grpc.distillery.v1 import logs_pb2, logs_pb2_grpc

log = logging.getLogger(__name__)

SEARCH_BATCH_LOGS = 2000  # logs per SearchBatches message (one conversion task)
# Rows per insert transaction: SQLite writes each touched index page once per commit, and the
# content-hash index is touched at random, so larger transactions insert much faster (measured:
# ~25k rows/s at 10k rows against ~18k at 2k, 600k rows in). A transaction is also committed
# once FLUSH_SECONDS have passed since the last one, so progress shows on slow streams.
ROWS_PER_TRANSACTION = 10_000
FLUSH_SECONDS = 2.0
MAX_WORKERS = 4
OUTPUT_KEYS = ("role", "content", "tool_calls", "function_call", "name")
REQUEST_KEYS = ("tools", "tool_choice", "response_format", "functions", "function_call")
GRPC_MAX_MESSAGE = 64 * 1024 * 1024  # a batch, or one log with 8 MiB payloads raw and normalized
SEARCH_BATCHES = "/distillery.v1.LogQuery/SearchBatches"


def default_workers() -> int:
    """Conversion processes when not configured: the CPUs left over by the api, at most 4."""
    return max(1, min(MAX_WORKERS, (os.cpu_count() or 2) - 1))


@dataclass
class LogImporter:
    """What the api needs to import logs: ingest's ``LogQuery`` address, the internal token, and
    how many worker processes convert logs into rows (0: in the event loop)."""

    address: str
    token: str = field(repr=False)
    workers: int = 0
    _pool: ProcessPoolExecutor | None = field(default=None, repr=False)

    def metadata(self, project_id: str) -> tuple[tuple[str, str], ...]:
        return ((INTERNAL_TOKEN_HEADER, self.token), (PROJECT_HEADER, project_id))

    def channel(self) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(
            self.address,
            interceptors=[tracing.ClientTracing()],
            options=[
                ("grpc.max_receive_message_length", GRPC_MAX_MESSAGE),
                ("grpc.max_send_message_length", GRPC_MAX_MESSAGE),
            ],
        )

    def executor(self) -> Executor | None:
        """The conversion pool, started on first use (``spawn``: safe beside gRPC's threads)."""
        if self.workers <= 0:
            return None
        if self._pool is None:
            context = multiprocessing.get_context("spawn")
            self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=context)
        return self._pool

    def discard_pool(self) -> None:
        """After a worker died: the next import starts a fresh pool."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await asyncio.to_thread(pool.shutdown, True, cancel_futures=True)


# --- a log becomes an entry ----------------------------------------------------------------------


def grpc_filters(filters: ImportFilters) -> logs_pb2.LogFilters:
    return logs_pb2.LogFilters(
        model=filters.model,
        completion_id=filters.completionId,
        status=filters.status,
        requested_after_ms=filters.requestedAfter,
        requested_before_ms=filters.requestedBefore,
        metadata=filters.metadata,
        request_contains=filters.requestContains,
        response_not_contains=filters.responseNotContains,
    )


def _output(message: Any) -> dict[str, Any]:
    """The assistant message to learn, without response-only fields (``refusal``, ``annotations``...)."""
    if not isinstance(message, dict):
        raise EntryError("the logged response has no choices[0].message")
    output = {key: message[key] for key in OUTPUT_KEYS if message.get(key) is not None}
    output["role"] = "assistant"
    output.setdefault("content", None)
    return output


def log_to_row(request: Any, response: Any, metadata: dict[str, str]) -> dict[str, Any]:
    """An OpenAI-shaped request and response as a dataset row (the input format of ``parse_entry``)."""
    if not isinstance(request, dict):
        raise EntryError("the logged request is not a JSON object")
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages:
        raise EntryError("the logged request has no messages")
    choices = response.get("choices") if isinstance(response, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise EntryError("the logged response has no choices[0].message")
    row: dict[str, Any] = {"messages": [*messages, _output(choices[0].get("message"))], "metadata": metadata}
    for key in REQUEST_KEYS:
        if request.get(key) is not None:
            row[key] = request[key]
    return row


def log_to_draft(log_entry: logs_pb2.RequestLog) -> EntryDraft:
    try:
        request = orjson.loads(log_entry.openai_request_json) if log_entry.openai_request_json else None
        response = orjson.loads(log_entry.openai_response_json) if log_entry.openai_response_json else None
    except orjson.JSONDecodeError:
        raise EntryError("the logged payload is not valid JSON") from None
    return parse_entry(log_to_row(request, response, dict(log_entry.metadata)))


@dataclass
class Converted:
    """One message of the stream, converted: rows to insert and what was skipped."""

    read: int = 0  # logs this batch accounts for (entries, failed calls, invalid logs)
    failed_calls: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)
    rows: list[EntryRow] = field(default_factory=list)

    def extend(self, other: Converted) -> None:
        self.read += other.read
        self.failed_calls += other.failed_calls
        self.errors += other.errors
        self.rows += other.rows


def convert_batch(data: bytes, dataset_id: str, moment: Any) -> Converted:
    """A serialized ``RequestLogBatch`` → driver rows. Runs in a worker process (or inline)."""
    converted = Converted()
    ids = entry_ids()
    for entry in logs_pb2.RequestLogBatch.FromString(data).logs:
        converted.read += 1
        if entry.status != "success":
            converted.failed_calls += 1
            continue
        try:
            draft = log_to_draft(entry)
        except EntryError as exc:
            converted.errors.append({"log_id": entry.id, "message": str(exc)})
            continue
        values = draft_values(
            draft,
            dataset_id=dataset_id,
            source=SOURCE,
            source_log_id=entry.id,
            provenance=SOURCE,
            moment=PLACEHOLDER_MOMENT,  # replaced by ``moment`` in the row
            entry_id=next(ids),
        )
        converted.rows.append(entry_row(values, moment))
    return converted


# --- the job -------------------------------------------------------------------------------------


async def start_import(
    *, session: AsyncSession, project_id: str, dataset_id: str, body: ImportLogsRequest
) -> DatasetJob:
    """Check the dataset and record a queued job; the caller runs :func:`run_import` after commit."""
    await get_dataset(session=session, project_id=project_id, dataset_id=dataset_id)
    params = {"filters": body.filters.model_dump(exclude_none=True), "limit": body.limit}
    if not params["filters"].get("metadata"):
        params["filters"].pop("metadata", None)
    return await jobs.create_job(
        session=session, project_id=project_id, dataset_id=dataset_id, kind=JOB_KIND, params=params
    )


class DatasetGone(Exception):
    """The dataset (and with it the job) was deleted while the import ran."""


@dataclass
class Tally:
    read: int = 0
    created: int = 0
    duplicates: int = 0
    failed_calls: int = 0
    invalid: int = 0

    def result(self) -> dict[str, int]:
        return {
            "logs_read": self.read,
            "entries_created": self.created,
            "skipped_duplicates": self.duplicates,
            "skipped_failed": self.failed_calls,
            "skipped_invalid": self.invalid,
        }


async def _write_batch(
    *,
    sessions: async_sessionmaker[AsyncSession],
    job_id: str,
    dataset_id: str,
    batch: Converted,
    tally: Tally,
) -> None:
    """Insert a batch's new entries and record the job's progress, in one transaction."""
    async with sessions.begin() as session:
        dataset = await session.get(Dataset, dataset_id)
        job = await session.get(DatasetJob, job_id)
        if dataset is None or job is None:
            raise DatasetGone
        inserted = await insert_entries(session=session, dataset=dataset, rows=batch.rows)
        tally.read += batch.read
        tally.created += inserted.created
        tally.duplicates += inserted.duplicates
        tally.failed_calls += batch.failed_calls
        tally.invalid += len(batch.errors)
        jobs.record_progress(job, done=tally.read, errors=batch.errors)
        job.result = tally.result()


async def _read_batches(
    call: grpc.aio.UnaryStreamCall,
    convert: Callable[[bytes], asyncio.Future[Converted]],
    queue: asyncio.Queue[asyncio.Future[Converted] | None],
) -> None:
    """Hand each message of the stream to a converter, in order; ``None`` marks the end."""
    try:
        async for data in call:
            await queue.put(convert(data))
    except Exception:
        await queue.put(None)  # what was read so far is written; the error surfaces from the task
        raise
    await queue.put(None)


def _rpc_problem(exc: grpc.aio.AioRpcError) -> str:
    if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
        return (
            "ingest refused the api's internal token: every process of one install needs the same "
            "DISTILLERY_INTERNAL_TOKEN (or DISTILLERY_SECRET_KEY)"
        )
    if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
        return f"invalid filters: {exc.details()}"
    return f"the request logs could not be read ({exc.code().name}); run the import again to resume"


async def _timestamp_value(sessions: async_sessionmaker[AsyncSession]) -> Any:
    """The job's timestamp as the catalog's driver takes it (rows are converted in workers)."""
    async with sessions() as session:
        dialect = (await session.connection()).dialect
    return driver_moment(dialect, now())


async def run_import(
    *,
    sessions: async_sessionmaker[AsyncSession],
    importer: LogImporter,
    job_id: str,
    project_id: str,
    dataset_id: str,
    body: ImportLogsRequest,
) -> None:
    """Stream, convert and insert; progress and the final status are committed on the job."""
    filters = grpc_filters(body.filters)
    tally = Tally()
    problem: str | None = None
    moment = await _timestamp_value(sessions)
    loop = asyncio.get_running_loop()
    executor = importer.executor()
    write = partial(_write_batch, sessions=sessions, job_id=job_id, dataset_id=dataset_id, tally=tally)

    def convert(data: bytes) -> asyncio.Future[Converted]:
        if executor is None:
            future = loop.create_future()
            future.set_result(convert_batch(data, dataset_id, moment))
            return future
        return loop.run_in_executor(executor, convert_batch, data, dataset_id, moment)

    async with importer.channel() as channel:
        stub = logs_pb2_grpc.LogQueryStub(channel)
        metadata = importer.metadata(project_id)
        try:
            counted = (await stub.Count(logs_pb2.CountLogsRequest(filters=filters), metadata=metadata)).count
            total = min(counted, body.limit) if body.limit else counted
            async with sessions.begin() as session:
                job = await session.get(DatasetJob, job_id)
                if job is None:
                    raise DatasetGone
                jobs.record_progress(job, total=total, status="running")
            # raw bytes: the batches are parsed where they are converted, not here
            search = channel.unary_stream(
                SEARCH_BATCHES,
                request_serializer=logs_pb2.SearchLogsRequest.SerializeToString,
                response_deserializer=None,
            )
            request = logs_pb2.SearchLogsRequest(
                filters=filters, limit=body.limit or 0, batch_size=SEARCH_BATCH_LOGS, omit_raw_payloads=True
            )
            queue: asyncio.Queue[asyncio.Future[Converted] | None] = asyncio.Queue(
                maxsize=importer.workers + 2
            )
            reader = asyncio.create_task(_read_batches(search(request, metadata=metadata), convert, queue))
            try:
                batch, since = Converted(), time.monotonic()
                while (pending := await queue.get()) is not None:
                    batch.extend(await pending)
                    if (
                        len(batch.rows) >= ROWS_PER_TRANSACTION
                        or batch.read >= 5 * ROWS_PER_TRANSACTION  # failed calls only: still progress
                        or time.monotonic() - since >= FLUSH_SECONDS
                    ):
                        await write(batch=batch)
                        batch, since = Converted(), time.monotonic()
                if batch.read:
                    await write(batch=batch)
            finally:
                if not reader.done():
                    reader.cancel()
            await reader  # raises what the stream raised
        except grpc.aio.AioRpcError as exc:
            log.warning("import job %s: LogQuery failed: %s", job_id, exc.code().name)
            problem = _rpc_problem(exc)
        except DatasetGone:
            log.info("import job %s: the dataset was deleted; stopped", job_id)
            return
        except BrokenProcessPool:
            importer.discard_pool()  # a worker died (killed?): the next import starts a fresh pool
            raise
    async with sessions.begin() as session:
        job = await session.get(DatasetJob, job_id)
        if job is None:
            return
        if problem is not None:
            jobs.record_progress(job, errors=[{"message": problem}])
        jobs.finish(job, result=tally.result())
    log.info("import job %s: %s", job_id, tally.result())
