"""Ingest logic: report bodies become log events published to Kafka, filters are parsed, stored
rows are shaped for clients. Both transports (``fastpath.py``, ``views.py``) call in here."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import ValidationError

from services.common import metrics, tracing
from services.common.clickhouse import ClickHouse
from services.common.errors import bad_request, invalid_input, unavailable
from services.common.events import LOGS_TOPIC, MAX_UNIX_MS, LogEvent, flat_event_json
from services.common.http import loads_json
from services.common.kafka import AckedProducer
from services.common.log_fields import LOG_STATUS_CHOICES, LOG_STATUSES, merge_metadata, new_log_id, stringify
from services.ingest import store
from services.ingest.models import (
    AnthropicReportRequest,
    LogFilter,
    ReportRequest,
    ReportResponse,
    RequestLog,
    Usage,
)
from services.ingest.store import LogFilters

log = logging.getLogger(__name__)


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


# --- reporting: a body becomes a log event, durable in Kafka before the 200 ---------------------


@dataclass
class IngestDeps:
    producer: AckedProducer
    clickhouse: ClickHouse


async def publish_event(d: IngestDeps, event: LogEvent) -> None:
    """Wait for the broker's ack: a 200 means the log is durable in Kafka. The producer gives up
    after the publish timeout (broker down included)."""
    try:
        await d.producer.send_and_wait(
            LOGS_TOPIC,
            flat_event_json(event),
            key=event.project_id.encode(),
            headers=tracing.kafka_headers(),
        )
    except Exception as exc:
        log.warning("publishing log %s failed: %s", event.log_id, type(exc).__name__)
        raise unavailable(
            "The log could not be recorded: the event broker is unavailable. Retry later."
        ) from exc


OK_BODY = ReportResponse().model_dump_json().encode()
REPORT_MODELS: dict[str, tuple[type[ReportRequest], str]] = {
    "/report": (ReportRequest, "openai"),
    "/report-anthropic": (AnthropicReportRequest, "anthropic"),
}
# The counters bound once: labels() on every report was ~1 % of its CPU.
_ACCEPTED = {route: metrics.INGEST_ACCEPTED.labels(route) for route in REPORT_MODELS}


def parse_report(raw: bytes, model: type[ReportRequest]) -> ReportRequest:
    """Raw bytes to a validated body, under the platform's JSON policy (``loads_json``)."""
    try:
        return model.model_validate(loads_json(raw))
    except ValidationError as exc:
        raise invalid_input(exc.errors()) from None


async def record_report(d: IngestDeps, route: str, raw: bytes, project_id: str) -> None:
    """Validate a ``/report`` or ``/report-anthropic`` body and publish it; used by the fast
    path (``fastpath.py``) and by the documented FastAPI routes (``views.py``)."""
    model, source = REPORT_MODELS[route]
    await publish_event(d, report_to_event(parse_report(raw, model), project_id=project_id, source=source))
    _ACCEPTED[route].inc()
