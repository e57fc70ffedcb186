"""Ingest HTTP routes (thin): report calls, update metadata, search and export logs."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse

from services.common.auth import require_project
from services.common.errors import APIError, bad_request, not_found, unavailable
from services.common.events import MAX_UNIX_MS
from services.common.http import openapi_json_body, openapi_query
from services.common.log_fields import LOG_STATUSES, stringify
from services.ingest import service, store
from services.ingest.models import (
    AnthropicReportRequest,
    LogCount,
    ReportRequest,
    ReportResponse,
    RequestLog,
    RequestLogList,
    UpdateMetadataRequest,
    UpdateMetadataResponse,
    UpdateTagsRequest,
)
from services.ingest.service import OK_BODY, IngestDeps, record_report

log = logging.getLogger(__name__)
router = APIRouter(tags=["logs"])

PAGE_PARAMS = ("limit", "cursor")
MAX_PAGE = 1000


async def deps(request: Request) -> IngestDeps:
    return request.app.state.ingest


async def _query(coro):  # type: ignore[no-untyped-def]
    try:
        return await coro
    except APIError:
        raise
    except Exception as exc:
        log.warning("ClickHouse query failed: %s", exc)
        raise unavailable("The log store is unavailable. Retry later.") from exc


def _report_body(model: type[ReportRequest]) -> dict:
    return openapi_json_body(model)


# The search filters every log route reads from the query string (service.filters_from_query).
_FILTER_QUERY = (
    ("model", {"type": "string"}, "the model the call named"),
    ("completionId", {"type": "string"}, "the provider's completion id"),
    ("status", {"type": "string", "enum": list(LOG_STATUSES)}, "outcome of the call"),
    ("requestedAfter", {"type": "integer", "minimum": 0, "maximum": MAX_UNIX_MS}, "unix ms, inclusive"),
    ("requestedBefore", {"type": "integer", "minimum": 0, "maximum": MAX_UNIX_MS}, "unix ms, exclusive"),
    ("requestContains", {"type": "string"}, "text the request payload contains"),
    ("responseNotContains", {"type": "string"}, "text the response payload does not contain"),
)
_METADATA_NOTE = "; also `metadata.<key>=<value>` (or `tags.<key>`) for each metadata pair to match"
_PAGE_QUERY = (
    ("limit", {"type": "integer", "minimum": 1, "maximum": MAX_PAGE}, "page size (default 50)"),
    ("cursor", {"type": "string"}, "`next_cursor` of the previous page"),
)


@router.post("/report", response_model=ReportResponse, openapi_extra=_report_body(ReportRequest))
async def report(
    request: Request, project_id: str = Depends(require_project), d: IngestDeps = Depends(deps)
) -> Response:
    await record_report(d, "/report", await request.body(), project_id)
    return Response(OK_BODY, media_type="application/json")


@router.post(
    "/report-anthropic", response_model=ReportResponse, openapi_extra=_report_body(AnthropicReportRequest)
)
async def report_anthropic(
    request: Request, project_id: str = Depends(require_project), d: IngestDeps = Depends(deps)
) -> Response:
    await record_report(d, "/report-anthropic", await request.body(), project_id)
    return Response(OK_BODY, media_type="application/json")


@router.post("/logs/update-metadata", response_model=UpdateMetadataResponse)
async def update_metadata(
    body: UpdateMetadataRequest, project_id: str = Depends(require_project), d: IngestDeps = Depends(deps)
) -> UpdateMetadataResponse:
    filters = service.filters_from_update(body.filters)
    changes = {k: stringify(v) for k, v in body.metadata.items()}
    matched = await _query(store.rewrite_metadata(d.clickhouse, project_id, filters, changes))
    return UpdateMetadataResponse(matchedLogs=matched)


@router.post("/logs/update-tags", response_model=UpdateMetadataResponse, deprecated=True)
async def update_tags(
    body: UpdateTagsRequest, project_id: str = Depends(require_project), d: IngestDeps = Depends(deps)
) -> UpdateMetadataResponse:
    filters = service.filters_from_update(body.filters)
    changes = {k: stringify(v) for k, v in body.tags.items()}
    matched = await _query(store.rewrite_metadata(d.clickhouse, project_id, filters, changes))
    return UpdateMetadataResponse(matchedLogs=matched)


def _limit(request: Request, default: int, maximum: int) -> int:
    raw = request.query_params.get("limit", str(default))
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= maximum:
        raise bad_request(f"limit must be an integer between 1 and {maximum}.", param="limit")
    return int(raw)


@router.get(
    "/logs",
    response_model=RequestLogList,
    description="Search logs, newest first" + _METADATA_NOTE,
    openapi_extra=openapi_query(*_FILTER_QUERY, *_PAGE_QUERY),
)
async def list_logs(
    request: Request, project_id: str = Depends(require_project), d: IngestDeps = Depends(deps)
) -> RequestLogList:
    filters = service.filters_from_query(request.query_params, allowed_extra=PAGE_PARAMS)
    limit = _limit(request, 50, MAX_PAGE)
    cursor = request.query_params.get("cursor")
    rows = await _query(store.search(d.clickhouse, project_id, filters, limit=limit + 1, before_id=cursor))
    page = rows[:limit]
    has_more = len(rows) > limit
    return RequestLogList(
        data=[service.row_to_log(r) for r in page],
        has_more=has_more,
        next_cursor=page[-1]["log_id"] if has_more else None,
    )


@router.get(
    "/logs/count",
    response_model=LogCount,
    description="Count matching logs" + _METADATA_NOTE,
    openapi_extra=openapi_query(*_FILTER_QUERY),
)
async def count_logs(
    request: Request, project_id: str = Depends(require_project), d: IngestDeps = Depends(deps)
) -> LogCount:
    filters = service.filters_from_query(request.query_params)
    return LogCount(count=await _query(store.count(d.clickhouse, project_id, filters)))


@router.get(
    "/logs/export",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/x-ndjson": {"schema": {"type": "string"}}}}},
    openapi_extra=openapi_query(
        *_FILTER_QUERY,
        ("limit", {"type": "integer", "minimum": 1, "maximum": 10_000_000}, "at most this many lines"),
    ),
)
async def export_logs(
    request: Request, project_id: str = Depends(require_project), d: IngestDeps = Depends(deps)
) -> StreamingResponse:
    """JSONL, one ``{"input", "output", "tags"}`` line per log, streamed page by page."""
    filters = service.filters_from_query(request.query_params, allowed_extra=("limit",))
    limit = _limit(request, 10_000_000, 10_000_000) if "limit" in request.query_params else None
    rows = service.iter_logs(d.clickhouse, project_id, filters, limit=limit)
    first = await _query(anext(rows, None))  # fail with a clean 503 before the stream starts

    async def lines() -> AsyncIterator[bytes]:
        if first is None:
            return
        yield orjson.dumps(service.row_to_export(first)) + b"\n"
        async for row in rows:
            yield orjson.dumps(service.row_to_export(row)) + b"\n"

    return StreamingResponse(
        lines(),
        media_type="application/x-ndjson",
        headers={"Content-Disposition": 'attachment; filename="request-logs.jsonl"'},
    )


@router.get("/logs/{log_id}", response_model=RequestLog)
async def get_log(
    log_id: str, project_id: str = Depends(require_project), d: IngestDeps = Depends(deps)
) -> RequestLog:
    row = await _query(store.get(d.clickhouse, project_id, log_id))
    if row is None:
        raise not_found(f"No log with id {log_id!r} in this project.", param="log_id")
    return service.row_to_log(row)
