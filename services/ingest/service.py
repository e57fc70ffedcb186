"""Ingest logic: turn report bodies into log events, parse filters, shape stored rows for clients."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import orjson

from services.common.clickhouse import ClickHouse
from services.common.errors import bad_request
from services.common.events import MAX_UNIX_MS, LogEvent
from services.common.log_fields import LOG_STATUS_CHOICES, LOG_STATUSES, merge_metadata, new_log_id, stringify
from services.ingest import store
from services.ingest.models import AnthropicReportRequest, LogFilter, ReportRequest, RequestLog, Usage
from services.ingest.store import LogFilters


def _payload_metadata(req_payload: Any) -> Mapping[str, Any] | None:
    metadata = req_payload.get("metadata") if isinstance(req_payload, dict) else None
    return metadata if isinstance(metadata, dict) else None


def report_to_event(body: ReportRequest, *, project_id: str, source: str) -> LogEvent:
    now_ms = time.time_ns() // 1_000_000
    received = int(body.receivedAt) if body.receivedAt is not None else now_ms
    requested = int(body.requestedAt) if body.requestedAt is not None else received
    extra = body.metadata if isinstance(body, AnthropicReportRequest) else None
    return LogEvent(
        log_id=new_log_id(now_ms),
        project_id=project_id,
        source=source,  # type: ignore[arg-type]
        requested_at=requested,
        received_at=received,
        req_payload=body.reqPayload,
        resp_payload=body.respPayload,
        status_code=int(body.statusCode) if body.statusCode is not None else None,
        error_message=body.errorMessage,
        metadata=merge_metadata(_payload_metadata(body.reqPayload), body.tags, extra),
    )


def filters_from_update(filters: list[LogFilter]) -> LogFilters:
    """The update-metadata filter list: ``model``, ``completionId``, ``metadata.<k>``/``tags.<k>``."""
    result = LogFilters()
    for i, f in enumerate(filters):
        value = stringify(f.equals) or ""
        if f.field == "model":
            result.model = value
        elif f.field == "completionId":
            result.completion_id = value
        elif f.field.startswith(("metadata.", "tags.")) and f.field.partition(".")[2]:
            result.metadata[f.field.partition(".")[2]] = value
        else:
            raise bad_request(
                f"Unknown filter field {f.field!r}: use 'model', 'completionId' or 'metadata.<key>'.",
                param=f"filters.{i}.field",
            )
    if not filters:
        raise bad_request("At least one filter is required.", param="filters")
    return result


def _int_param(params: Mapping[str, str], name: str) -> int | None:
    raw = params.get(name)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_UNIX_MS:
        raise bad_request(
            f"{name} must be an integer between 0 and {MAX_UNIX_MS} (unix milliseconds), got {raw!r}.",
            param=name,
        )
    return value


def filters_from_query(params: Mapping[str, str], *, allowed_extra: tuple[str, ...] = ()) -> LogFilters:
    """Log search filters from query parameters; an unknown parameter is a 400 naming it."""
    metadata: dict[str, str] = {}
    for name, value in params.items():
        if name.startswith(("metadata.", "tags.")) and name.partition(".")[2]:
            metadata[name.partition(".")[2]] = value
        elif name not in store.FILTER_FIELDS and name not in allowed_extra:
            raise bad_request(f"Unknown filter {name!r}.", param=name)
    status = params.get("status")
    if status is not None and status not in LOG_STATUSES:
        raise bad_request(f"status must be one of {LOG_STATUS_CHOICES}.", param="status")
    return LogFilters(
        model=params.get("model"),
        completion_id=params.get("completionId"),
        status=status,
        requested_after_ms=_int_param(params, "requestedAfter"),
        requested_before_ms=_int_param(params, "requestedBefore"),
        metadata=metadata,
        request_contains=params.get("requestContains"),
        response_not_contains=params.get("responseNotContains"),
    )


def _loads(text: str) -> Any:
    return orjson.loads(text) if text else None


def row_to_log(row: dict) -> RequestLog:
    return RequestLog(
        id=row["log_id"],
        requestedAt=row["requested_at_ms"],
        receivedAt=row["received_at_ms"],
        latencyMs=row["latency_ms"],
        model=row["model"],
        provider=row["provider"],
        completionId=row["completion_id"],
        status=row["status"],
        statusCode=row["status_code"],
        errorMessage=row["error_message"],
        finishReason=row["finish_reason"],
        usage=Usage(
            prompt_tokens=row["prompt_tokens"],
            completion_tokens=row["completion_tokens"],
            total_tokens=row["prompt_tokens"] + row["completion_tokens"],
        ),
        cost=row["cost_usd"],
        cacheHit=bool(row["cache_hit"]),
        metadata=dict(row["metadata"]),
        reqPayload=_loads(row["req_payload"]),
        respPayload=_loads(row["resp_payload"]),
    )


def row_to_export(row: dict) -> dict:
    """The documented export line: ``input`` (request), ``output`` (response or error), ``tags``.

    Anthropic logs export in their OpenAI-normalized shape, ready for dataset import.
    """
    output = _loads(row["openai_resp"] or row["resp_payload"])
    if row["status"] == "error" and output is None:
        output = {"error": {"message": row["error_message"], "status": row["status_code"]}}
    return {
        "input": _loads(row["openai_req"] or row["req_payload"]),
        "output": output,
        "tags": dict(row["metadata"]),
    }


async def iter_logs(
    ch: ClickHouse,
    project_id: str,
    filters: LogFilters,
    *,
    page_size: int = 1000,
    limit: int | None = None,
    before_id: str | None = None,
) -> AsyncIterator[dict]:
    """Every matching row, newest first, fetched page by page, starting below ``before_id`` if given."""
    cursor, sent = before_id or None, 0
    while limit is None or sent < limit:
        size = page_size if limit is None else min(page_size, limit - sent)
        rows = await store.search(ch, project_id, filters, limit=size, before_id=cursor)
        for row in rows:
            yield row
        sent += len(rows)
        if len(rows) < size:
            return
        cursor = rows[-1]["log_id"]
