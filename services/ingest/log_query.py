"""gRPC ``LogQuery``: other services search and count a project's request logs.

The caller's project comes from ``authorization: Bearer <key>`` metadata, exactly as over
HTTP; a call never sees another project's logs. Platform services that hold no project key
(the api importing logs into a dataset) send ``x-distillery-internal-token: <token>`` and
``x-distillery-project: <project id>`` instead: the shared internal token (see
``services.common.secrets.internal_token``) vouches for the caller, the project header decides
whose logs it sees. Neither the token nor a key is ever logged or echoed.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator

import grpc

from services.common.auth import KeyRing, resolve_grpc_project
from services.common.clickhouse import ClickHouse
from services.common.errors import APIError
from services.common.grpc.distillery.v1 import logs_pb2, logs_pb2_grpc
from services.common.log_fields import LOG_STATUS_CHOICES, LOG_STATUSES
from services.ingest import store
from services.ingest.store import LogFilters

log = logging.getLogger(__name__)

STORE_UNAVAILABLE = "The log store is unavailable. Retry later."
DEFAULT_BATCH_LOGS = 1000
MAX_BATCH_LOGS = 10_000
BATCH_PAYLOAD_BYTES = 8 * 1024 * 1024  # payloads per batch, unless one log alone is larger
PAGE_ROWS = 5000  # rows per ClickHouse query behind SearchBatches


class InvalidArgument(ValueError):
    """A request field the caller must fix; the message names the field."""


def filters_from_proto(message: logs_pb2.LogFilters) -> LogFilters:
    def optional(name: str) -> str | int | None:
        return getattr(message, name) if message.HasField(name) else None

    status = optional("status")
    if status is not None and status not in LOG_STATUSES:
        raise InvalidArgument(f"filters.status must be one of {LOG_STATUS_CHOICES}.")
    return LogFilters(
        model=optional("model"),
        completion_id=optional("completion_id"),
        status=status,
        requested_after_ms=optional("requested_after_ms"),
        requested_before_ms=optional("requested_before_ms"),
        metadata=dict(message.metadata),
        request_contains=optional("request_contains"),
        response_not_contains=optional("response_not_contains"),
    )


# ``RequestLog`` fields as ClickHouse expressions over a stored row: ClickHouse picks the payload
# columns (the OpenAI-shaped ones fall back to the raw ones), so only what is sent is decoded.
_LOG_FIELDS = {
    "id": "log_id",
    "requested_at_ms": "requested_at_ms",
    "received_at_ms": "received_at_ms",
    "latency_ms": "latency_ms",
    "model": "model",
    "provider": "provider",
    "completion_id": "completion_id",
    "status": "status",
    "status_code": "status_code",
    "error_message": "ifNull(error_message, '')",
    "finish_reason": "finish_reason",
    "prompt_tokens": "prompt_tokens",
    "completion_tokens": "completion_tokens",
    "cost_usd": "cost_usd",
    "cache_hit": "cache_hit",
    "metadata": "metadata",
    "openai_request_json": "if(openai_req = '', req_payload, openai_req)",
    "openai_response_json": "if(openai_resp = '', resp_payload, openai_resp)",
}
_RAW_FIELDS = {"req_payload_json": "req_payload", "resp_payload_json": "resp_payload"}


def request_log_fields(request: logs_pb2.SearchLogsRequest) -> tuple[tuple[str, ...], str]:
    """The field names of each selected row (``id`` first: it is the cursor) and the SELECT list
    that produces them; raises InvalidArgument for an unknown name in ``request.fields``."""
    known = {**_LOG_FIELDS, **({} if request.omit_raw_payloads else _RAW_FIELDS)}
    if not request.fields:
        return tuple(known), ", ".join(known.values())
    unknown = sorted(set(request.fields) - set(_LOG_FIELDS) - set(_RAW_FIELDS))
    if unknown:
        raise InvalidArgument(f"fields: unknown RequestLog field(s) {', '.join(unknown)}.")
    names = ("id", *(name for name in known if name != "id" and name in request.fields))
    return names, ", ".join(known[name] for name in names)


async def prefetched_pages(
    ch: ClickHouse,
    project_id: str,
    filters: LogFilters,
    columns: str,
    *,
    page_size: int,
    limit: int | None,
    before_id: str | None,
) -> AsyncIterator[list[tuple]]:
    """Matching rows (``columns``, log id first) page by page, newest first, the next page already
    being read from ClickHouse while the caller works on this one."""
    sent = 0

    def fetch(cursor: str | None) -> asyncio.Future[list[tuple]]:
        size = page_size if limit is None else min(page_size, limit - sent)
        return asyncio.ensure_future(
            store.search_selected(ch, project_id, filters, columns, limit=size, before_id=cursor)
        )

    pending: asyncio.Future[list[tuple]] | None = fetch(before_id or None)
    try:
        while pending is not None:
            expected = page_size if limit is None else min(page_size, limit - sent)
            rows = await pending
            sent += len(rows)
            more = len(rows) == expected and (limit is None or sent < limit)
            pending = fetch(rows[-1][0]) if more else None
            if rows:
                yield rows
    finally:
        if pending is not None:
            pending.cancel()


def batches_of(rows: list[tuple], names: tuple[str, ...], size: int) -> list[logs_pb2.RequestLogBatch]:
    """``rows`` as messages of at most ``size`` logs, each ending early once its payloads pass
    ``BATCH_PAYLOAD_BYTES``. Runs in a worker thread: building the messages is most of what a
    bulk read costs, and the event loop has requests to serve."""
    payloads = [names.index(n) for n in names if n.endswith("_json")]
    batches, batch, payload_bytes = [], logs_pb2.RequestLogBatch(), 0
    for row in rows:
        row_bytes = sum(len(row[i]) for i in payloads)
        if batch.logs and (len(batch.logs) >= size or payload_bytes + row_bytes > BATCH_PAYLOAD_BYTES):
            batches.append(batch)
            batch, payload_bytes = logs_pb2.RequestLogBatch(), 0
        batch.logs.add(**dict(zip(names, row, strict=True)))
        payload_bytes += row_bytes
    if batch.logs:
        batches.append(batch)
    return batches


class LogQueryServicer(logs_pb2_grpc.LogQueryServicer):
    def __init__(self, clickhouse: ClickHouse, keyring: KeyRing, internal_token: str | None = None) -> None:
        self.clickhouse = clickhouse
        self.keyring = keyring
        self.internal_token = internal_token

    async def _project(self, context: grpc.aio.ServicerContext) -> str:
        try:
            return resolve_grpc_project(self.keyring, context.invocation_metadata(), self.internal_token)
        except APIError as exc:  # the message never echoes the key or the token
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, exc.message)

    async def _filters(self, message: logs_pb2.LogFilters, context: grpc.aio.ServicerContext) -> LogFilters:
        try:
            return filters_from_proto(message)
        except InvalidArgument as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    async def _fields(
        self, request: logs_pb2.SearchLogsRequest, context: grpc.aio.ServicerContext
    ) -> tuple[tuple[str, ...], str]:
        try:
            return request_log_fields(request)
        except InvalidArgument as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    async def Search(
        self, request: logs_pb2.SearchLogsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[logs_pb2.RequestLog]:
        project_id = await self._project(context)
        filters = await self._filters(request.filters, context)
        names, columns = await self._fields(request, context)
        pages = prefetched_pages(
            self.clickhouse,
            project_id,
            filters,
            columns,
            page_size=PAGE_ROWS,
            limit=request.limit or None,
            before_id=request.before_id,
        )
        try:
            async for rows in pages:
                for row in rows:
                    yield logs_pb2.RequestLog(**dict(zip(names, row, strict=True)))
        except Exception as exc:
            log.warning("LogQuery.Search failed: %s", exc)
            await context.abort(grpc.StatusCode.UNAVAILABLE, STORE_UNAVAILABLE)

    async def SearchBatches(
        self, request: logs_pb2.SearchLogsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[logs_pb2.RequestLogBatch]:
        project_id = await self._project(context)
        filters = await self._filters(request.filters, context)
        size = min(request.batch_size or DEFAULT_BATCH_LOGS, MAX_BATCH_LOGS)
        names, columns = await self._fields(request, context)
        pages = prefetched_pages(
            self.clickhouse,
            project_id,
            filters,
            columns,
            page_size=size * math.ceil(PAGE_ROWS / size),  # whole batches: only the last one is short
            limit=request.limit or None,
            before_id=request.before_id,
        )
        try:
            async for rows in pages:
                for batch in await asyncio.to_thread(batches_of, rows, names, size):
                    yield batch
        except Exception as exc:
            log.warning("LogQuery.SearchBatches failed: %s", exc)
            await context.abort(grpc.StatusCode.UNAVAILABLE, STORE_UNAVAILABLE)

    async def Count(
        self, request: logs_pb2.CountLogsRequest, context: grpc.aio.ServicerContext
    ) -> logs_pb2.CountLogsResponse:
        project_id = await self._project(context)
        filters = await self._filters(request.filters, context)
        try:
            total = await store.count(self.clickhouse, project_id, filters)
        except Exception as exc:
            log.warning("LogQuery.Count failed: %s", exc)
            await context.abort(grpc.StatusCode.UNAVAILABLE, STORE_UNAVAILABLE)
        return logs_pb2.CountLogsResponse(count=total)


def add_to_server(
    server: grpc.aio.Server, *, clickhouse: ClickHouse, keyring: KeyRing, internal_token: str | None = None
) -> None:
    """``internal_token`` enables the internal-caller path; without it only project keys work."""
    servicer = LogQueryServicer(clickhouse, keyring, internal_token)
    logs_pb2_grpc.add_LogQueryServicer_to_server(servicer, server)
