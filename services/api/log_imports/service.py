"""Importing request logs into a dataset, server-side and in bulk.

Only ingest reads ClickHouse, so the api streams the matching logs from ingest's gRPC
``LogQuery.SearchBatches`` (``Search``, a thousand logs per message) as an internal caller:
``x-distillery-internal-token`` plus the project id in ``x-distillery-project``, which decides
whose logs are read. Each successful call becomes an entry: the request's messages followed by
``choices[0].message`` as the output, the request's ``tools``/``tool_choice``/``response_format``,
the log's metadata, ``source``/``provenance`` ``request_log`` and ``source_log_id`` = the log id.
Failed and pending calls are skipped; a log already in the dataset is skipped (re-importing is
idempotent, and the unique ``(dataset_id, source_log_id)`` makes it so under concurrency too).

Throughput: each message of the stream (up to ``SEARCH_BATCH_LOGS`` logs) is converted into
ready-to-insert rows by a small pool of worker processes (JSON parsing and row validation are
CPU-bound; the api's event loop keeps streaming and inserting meanwhile), then inserted with
one driver-level executemany per message, in its own transaction together with the job's
progress.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import grpc
import orjson
from sqlalchemy import JSON, insert, select
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.api.datasets import jobs
from services.api.datasets.models import Dataset, DatasetEntry, DatasetJob
from services.api.datasets.rows import EntryDraft, EntryError, parse_entry
from services.api.datasets.service import draft_values, get_dataset, now
from services.api.log_imports.models import JOB_KIND, SOURCE, ImportFilters, ImportLogsRequest
from services.common.grpc.distillery.v1 import logs_pb2, logs_pb2_grpc

log = logging.getLogger(__name__)

SEARCH_BATCH_LOGS = 2000  # logs per SearchBatches message = rows per insert transaction
LOOKUP_CHUNK = 500  # source_log_ids per "already imported?" query
MAX_WORKERS = 4
INTERNAL_TOKEN_HEADER = "x-distillery-internal-token"
PROJECT_HEADER = "x-distillery-project"
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


# --- rows ready for the driver -------------------------------------------------------------------

_ATTRIBUTE = {c.name: attr.key for attr in DatasetEntry.__mapper__.column_attrs for c in attr.columns}
_JSON_COLUMNS = frozenset(c.name for c in DatasetEntry.__table__.columns if isinstance(c.type, JSON))
_TIME_COLUMNS = ("created_at", "updated_at")
_PLACEHOLDER_MOMENT = datetime(2000, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class RowLayout:
    """``INSERT ... ON CONFLICT (dataset_id, source_log_id) DO NOTHING`` compiled for the catalog's
    dialect, and how to lay a row out for it. Rows go to the driver as they are (one executemany),
    JSON already serialized (orjson, as SQLAlchemy's JSON type would store it, ``None`` as JSON
    null) and timestamps already in the driver's form: per-row SQLAlchemy processing would cost
    more than the insert itself. Picklable, so worker processes build rows with it."""

    sql: str
    columns: tuple[str, ...]  # parameter order
    positional: bool

    @staticmethod
    def for_dialect(dialect: Dialect) -> RowLayout:
        table = DatasetEntry.__table__
        if dialect.name == "sqlite":
            from sqlalchemy.dialects.sqlite import insert as dialect_insert
        elif dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as dialect_insert
        else:  # pragma: no cover - the catalog runs on SQLite or Postgres
            dialect_insert = insert
        statement = dialect_insert(table)
        if hasattr(statement, "on_conflict_do_nothing"):
            statement = statement.on_conflict_do_nothing(index_elements=["dataset_id", "source_log_id"])
        compiled = statement.compile(dialect=dialect, column_keys=[c.name for c in table.columns])
        positional = bool(compiled.positional)
        columns = tuple(compiled.positiontup) if positional else tuple(c.name for c in table.columns)
        return RowLayout(compiled.string, columns, positional)

    def row(self, values: dict[str, Any], moment: Any) -> tuple[Any, ...] | dict[str, Any]:
        """``draft_values`` output as driver parameters; ``moment`` is the processed timestamp."""
        out = []
        for column in self.columns:
            if column in _TIME_COLUMNS:
                out.append(moment)
            elif column in _JSON_COLUMNS:
                out.append(orjson.dumps(values[_ATTRIBUTE[column]]).decode())
            else:
                out.append(values[_ATTRIBUTE[column]])
        return tuple(out) if self.positional else dict(zip(self.columns, out, strict=True))


_LAYOUTS: dict[str, RowLayout] = {}


def layout_for(dialect: Dialect) -> RowLayout:
    key = f"{dialect.name}+{dialect.driver}"
    if key not in _LAYOUTS:
        _LAYOUTS[key] = RowLayout.for_dialect(dialect)
    return _LAYOUTS[key]


@dataclass
class Converted:
    """One message of the stream, converted: rows to insert (aligned with ``log_ids``) and counts."""

    read: int = 0  # logs this batch accounts for (entries, failed calls, invalid logs)
    failed_calls: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)
    log_ids: list[str] = field(default_factory=list)
    rows: list[Any] = field(default_factory=list)


def convert_batch(data: bytes, layout: RowLayout, dataset_id: str, moment: Any) -> Converted:
    """A serialized ``RequestLogBatch`` → driver rows. Runs in a worker process (or inline)."""
    converted = Converted()
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
            moment=_PLACEHOLDER_MOMENT,  # replaced by ``moment`` in the row
        )
        converted.log_ids.append(entry.id)
        converted.rows.append(layout.row(values, moment))
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


async def _already_imported(*, session: AsyncSession, dataset_id: str, log_ids: list[str]) -> set[str]:
    found: set[str] = set()
    for start in range(0, len(log_ids), LOOKUP_CHUNK):
        chunk = log_ids[start : start + LOOKUP_CHUNK]
        rows = await session.scalars(
            select(DatasetEntry.source_log_id).where(
                DatasetEntry.dataset_id == dataset_id, DatasetEntry.source_log_id.in_(chunk)
            )
        )
        found.update(rows)
    return found


async def _write_batch(
    *,
    sessions: async_sessionmaker[AsyncSession],
    job_id: str,
    dataset_id: str,
    layout: RowLayout,
    batch: Converted,
    tally: Tally,
) -> None:
    """Insert a batch's new entries and record the job's progress, in one transaction."""
    async with sessions.begin() as session:
        dataset = await session.get(Dataset, dataset_id)
        job = await session.get(DatasetJob, job_id)
        if dataset is None or job is None:
            raise DatasetGone
        known = await _already_imported(session=session, dataset_id=dataset_id, log_ids=batch.log_ids)
        rows = [row for log_id, row in zip(batch.log_ids, batch.rows, strict=True) if log_id not in known]
        if rows:
            connection = await session.connection()
            await connection.exec_driver_sql(layout.sql, rows)
            dataset.updated_at = now()
        tally.read += batch.read
        tally.created += len(rows)
        tally.duplicates += len(batch.rows) - len(rows)
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


async def _timestamp_value(sessions: async_sessionmaker[AsyncSession]) -> tuple[RowLayout, Any]:
    """The layout for the catalog's dialect and the job's timestamp as the driver takes it."""
    async with sessions() as session:
        dialect = (await session.connection()).dialect
    processor = DatasetEntry.__table__.c.created_at.type.dialect_impl(dialect).bind_processor(dialect)
    moment = now()
    return layout_for(dialect), processor(moment) if processor is not None else moment


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
    layout, moment = await _timestamp_value(sessions)
    loop = asyncio.get_running_loop()
    executor = importer.executor()

    def convert(data: bytes) -> asyncio.Future[Converted]:
        if executor is None:
            future = loop.create_future()
            future.set_result(convert_batch(data, layout, dataset_id, moment))
            return future
        return loop.run_in_executor(executor, convert_batch, data, layout, dataset_id, moment)

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
                import time as _t
                _w = {"get": 0.0, "conv": 0.0, "write": 0.0}
                while True:
                    _a = _t.perf_counter()
                    pending = await queue.get()
                    _b = _t.perf_counter(); _w["get"] += _b - _a
                    if pending is None:
                        log.warning("TIMING %s", _w)
                        break
                    batch = await pending
                    _c = _t.perf_counter(); _w["conv"] += _c - _b
                    await _write_batch(
                        sessions=sessions,
                        job_id=job_id,
                        dataset_id=dataset_id,
                        layout=layout,
                        batch=batch,
                        tally=tally,
                    )
                    _w["write"] += _t.perf_counter() - _c
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
