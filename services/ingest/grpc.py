"""gRPC ``LogQuery``: other services search and count a project's request logs.

The caller's project comes from ``authorization: Bearer <key>`` metadata, exactly as over
HTTP; a call never sees another project's logs.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc

from services.common.auth import KeyRing, resolve_project
from services.common.clickhouse import ClickHouse
from services.common.errors import APIError
from services.common.grpc.distillery.v1 import logs_pb2, logs_pb2_grpc
from services.ingest import service, store
from services.ingest.store import LogFilters

log = logging.getLogger(__name__)

STATUSES = ("success", "error", "pending")

STORE_UNAVAILABLE = "The log store is unavailable. Retry later."


class InvalidArgument(ValueError):
    """A request field the caller must fix; the message names the field."""


def filters_from_proto(message: logs_pb2.LogFilters) -> LogFilters:
    def optional(name: str) -> str | int | None:
        return getattr(message, name) if message.HasField(name) else None

    status = optional("status")
    if status is not None and status not in STATUSES:
        raise InvalidArgument("filters.status must be one of 'success', 'error', 'pending'.")
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


def row_to_proto(row: dict) -> logs_pb2.RequestLog:
    """A stored row; the OpenAI-shaped payloads fall back to the raw ones when not converted."""
    return logs_pb2.RequestLog(
        id=row["log_id"],
        requested_at_ms=row["requested_at_ms"],
        received_at_ms=row["received_at_ms"],
        latency_ms=row["latency_ms"],
        model=row["model"],
        provider=row["provider"],
        completion_id=row["completion_id"],
        status=row["status"],
        status_code=row["status_code"],
        error_message=row["error_message"] or "",
        finish_reason=row["finish_reason"],
        prompt_tokens=row["prompt_tokens"],
        completion_tokens=row["completion_tokens"],
        cost_usd=row["cost_usd"],
        cache_hit=bool(row["cache_hit"]),
        metadata=dict(row["metadata"]),
        req_payload_json=row["req_payload"],
        resp_payload_json=row["resp_payload"],
        openai_request_json=row["openai_req"] or row["req_payload"],
        openai_response_json=row["openai_resp"] or row["resp_payload"],
    )


def _authorization(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key.lower() == "authorization":
            return value if isinstance(value, str) else None
    return None


class LogQueryServicer(logs_pb2_grpc.LogQueryServicer):
    def __init__(self, clickhouse: ClickHouse, keyring: KeyRing) -> None:
        self.clickhouse = clickhouse
        self.keyring = keyring

    async def _project(self, context: grpc.aio.ServicerContext) -> str:
        try:
            return resolve_project(self.keyring, _authorization(context))
        except APIError as exc:  # the message never echoes the key
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, exc.message)

    async def _filters(self, message: logs_pb2.LogFilters, context: grpc.aio.ServicerContext) -> LogFilters:
        try:
            return filters_from_proto(message)
        except InvalidArgument as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    async def Search(
        self, request: logs_pb2.SearchLogsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[logs_pb2.RequestLog]:
        project_id = await self._project(context)
        filters = await self._filters(request.filters, context)
        rows = service.iter_logs(
            self.clickhouse, project_id, filters, limit=request.limit or None, before_id=request.before_id
        )
        try:
            async for row in rows:
                yield row_to_proto(row)
        except Exception as exc:
            log.warning("LogQuery.Search failed: %s", exc)
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


def add_to_server(server: grpc.aio.Server, *, clickhouse: ClickHouse, keyring: KeyRing) -> None:
    logs_pb2_grpc.add_LogQueryServicer_to_server(LogQueryServicer(clickhouse, keyring), server)
