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

The roles, one file each: ``client.py`` (ingest's LogQuery and the conversion pool),
``convert.py`` (a log becomes an entry row), this module (the job), and the entries are written
by ``datasets.service.insert_entries``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from functools import partial
from typing import Any

import grpc
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.api.datasets import jobs
from services.api.datasets.bulk import driver_moment
from services.api.datasets.models import Dataset, DatasetJob
from services.api.datasets.service import get_dataset, insert_entries
from services.api.log_imports.client import SEARCH_BATCHES, LogImporter, grpc_filters, rpc_problem
from services.api.log_imports.convert import LOG_FIELDS, Converted, convert_batch
from services.api.log_imports.schemas import JOB_KIND, ImportLogsRequest
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
                filters=filters, limit=body.limit or 0, batch_size=SEARCH_BATCH_LOGS, fields=LOG_FIELDS
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
            problem = rpc_problem(exc)
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
