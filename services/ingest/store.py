"""Request logs in ClickHouse: the table, the row a log event becomes, and every query on it.

``request_logs`` is a ReplacingMergeTree keyed by (project_id, log_id) with a version
column: re-delivered events collapse into one row, and metadata updates are new
versions of the whole row. Every read uses ``FINAL`` so duplicates are never visible.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from services.common import anthropic_format
from services.common.clickhouse import ClickHouse
from services.common.events import LogEvent
from services.ingest.pricing import cost_usd

TABLE = "request_logs"

COLUMNS: tuple[str, ...] = (
    "project_id",
    "log_id",
    "version",
    "source",
    "requested_at_ms",
    "received_at_ms",
    "latency_ms",
    "model",
    "provider",
    "completion_id",
    "status",
    "status_code",
    "error_message",
    "prompt_tokens",
    "completion_tokens",
    "finish_reason",
    "cost_usd",
    "cache_hit",
    "metadata",
    "req_payload",
    "resp_payload",
    "openai_req",
    "openai_resp",
    "ingested_at_ms",
)

DDL = """
CREATE TABLE IF NOT EXISTS {db}.request_logs (
    project_id LowCardinality(String),
    log_id String,
    version UInt64,
    source LowCardinality(String),
    requested_at_ms Int64,
    received_at_ms Int64,
    latency_ms Int64,
    model LowCardinality(String),
    provider LowCardinality(String),
    completion_id String,
    status LowCardinality(String),
    status_code Nullable(Int32),
    error_message Nullable(String),
    prompt_tokens UInt32,
    completion_tokens UInt32,
    finish_reason LowCardinality(String),
    cost_usd Nullable(Float64),
    cache_hit UInt8,
    metadata Map(String, String),
    req_payload String CODEC(ZSTD(3)),
    resp_payload String CODEC(ZSTD(3)),
    openai_req String CODEC(ZSTD(3)),
    openai_resp String CODEC(ZSTD(3)),
    ingested_at_ms Int64
) ENGINE = ReplacingMergeTree(version)
PARTITION BY toYYYYMM(fromUnixTimestamp64Milli(requested_at_ms))
ORDER BY (project_id, log_id)
SETTINGS non_replicated_deduplication_window = 10000
"""


async def create_schema(ch: ClickHouse) -> None:
    await ch.command(f"CREATE DATABASE IF NOT EXISTS {ch.database}")
    await ch.command(DDL.format(db=ch.database))


def _provider(model: str, source: str) -> str:
    if source == "anthropic":
        return "anthropic"
    prefix, sep, _ = model.partition(":")
    return prefix if sep and prefix in ("openai", "anthropic", "gemini", "openpipe") else "openai"


def _status(event: LogEvent) -> str:
    if event.status_code is None:
        return "error" if event.error_message else "pending"
    return "success" if 200 <= event.status_code < 300 and not event.error_message else "error"


def _json(value: Any) -> str:
    return "" if value is None else orjson.dumps(value).decode()


def _usage(resp: Any) -> tuple[int, int]:
    usage = resp.get("usage") if isinstance(resp, dict) else None
    if not isinstance(usage, dict):
        return 0, 0
    return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)


def _finish_reason(resp: Any) -> str:
    choices = resp.get("choices") if isinstance(resp, dict) else None
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        return str(choices[0].get("finish_reason") or "")
    return ""


def _cost(event: LogEvent, model: str, prompt_tokens: int, completion_tokens: int) -> float | None:
    if event.cost_usd is not None:
        return event.cost_usd
    return cost_usd(model, prompt_tokens, completion_tokens)


def event_to_row(event: LogEvent, now_ms: int | None = None) -> list[Any]:
    """Derive every column of a log from what the producer observed."""
    req, resp = event.req_payload, event.resp_payload
    openai_req, openai_resp = req, resp
    if event.source == "anthropic":
        openai_req = anthropic_format.request_to_openai(req)
        openai_resp = anthropic_format.response_to_openai(resp, created=event.received_at // 1000)
    model = ""
    if isinstance(req, dict) and req.get("model"):
        model = str(req["model"])
    elif isinstance(resp, dict) and resp.get("model"):
        model = str(resp["model"])
    prompt_tokens, completion_tokens = _usage(openai_resp)
    status = _status(event)
    completion_id = str(resp.get("id") or "") if isinstance(resp, dict) and status == "success" else ""
    return [
        event.project_id,
        event.log_id,
        0,
        event.source,
        event.requested_at,
        event.received_at,
        max(0, event.received_at - event.requested_at),
        model,
        _provider(model, event.source),
        completion_id,
        status,
        event.status_code,
        event.error_message,
        prompt_tokens,
        completion_tokens,
        _finish_reason(openai_resp),
        _cost(event, model, prompt_tokens, completion_tokens) if status == "success" else None,
        int(event.cache_hit),
        event.metadata,
        _json(req),
        _json(resp),
        _json(openai_req) if event.source == "anthropic" else "",
        _json(openai_resp) if event.source == "anthropic" else "",
        now_ms if now_ms is not None else int(time.time() * 1000),
    ]


def dedup_token(rows: list[list[Any]]) -> str:
    """Same rows → same token, so a retried insert of the same batch is dropped by ClickHouse."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(f"{row[0]}/{row[1]}/{row[2]};".encode())
    return digest.hexdigest()


async def insert_rows(ch: ClickHouse, rows: list[list[Any]]) -> None:
    await ch.insert(
        f"{ch.database}.{TABLE}", rows, COLUMNS, settings={"insert_deduplication_token": dedup_token(rows)}
    )


# --- queries -------------------------------------------------------------------------------------

FILTER_FIELDS = (
    "model",
    "completionId",
    "status",
    "requestedAfter",
    "requestedBefore",
    "requestContains",
    "responseNotContains",
)


@dataclass
class LogFilters:
    """What a log search can narrow by; all conditions AND together."""

    model: str | None = None
    completion_id: str | None = None
    status: str | None = None
    requested_after_ms: int | None = None
    requested_before_ms: int | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    request_contains: str | None = None
    response_not_contains: str | None = None


def where_clause(project_id: str, f: LogFilters) -> tuple[str, dict[str, Any]]:
    conditions = ["project_id = {project_id:String}"]
    params: dict[str, Any] = {"project_id": project_id}
    simple = (
        ("model", f.model, "String"),
        ("completion_id", f.completion_id, "String"),
        ("status", f.status, "String"),
    )
    for column, value, kind in simple:
        if value is not None:
            conditions.append(f"{column} = {{{column}:{kind}}}")
            params[column] = value
    if f.requested_after_ms is not None:
        conditions.append("requested_at_ms >= {after:Int64}")
        params["after"] = f.requested_after_ms
    if f.requested_before_ms is not None:
        conditions.append("requested_at_ms < {before:Int64}")
        params["before"] = f.requested_before_ms
    for i, (key, value) in enumerate(sorted(f.metadata.items())):
        conditions.append(f"metadata[{{mk{i}:String}}] = {{mv{i}:String}}")
        params[f"mk{i}"], params[f"mv{i}"] = key, value
    if f.request_contains:
        conditions.append("positionCaseInsensitiveUTF8(req_payload, {req_text:String}) > 0")
        params["req_text"] = f.request_contains
    if f.response_not_contains:
        conditions.append("positionCaseInsensitiveUTF8(resp_payload, {resp_text:String}) = 0")
        params["resp_text"] = f.response_not_contains
    return " AND ".join(conditions), params


async def search(
    ch: ClickHouse, project_id: str, filters: LogFilters, *, limit: int, before_id: str | None = None
) -> list[dict]:
    """Newest first (log ids are time-ordered); ``before_id`` is the pagination cursor."""
    where, params = where_clause(project_id, filters)
    if before_id:
        where += " AND log_id < {before_id:String}"
        params["before_id"] = before_id
    params["limit"] = limit
    sql = (
        f"SELECT * FROM {ch.database}.{TABLE} FINAL WHERE {where} ORDER BY log_id DESC LIMIT {{limit:UInt32}}"
    )
    return await ch.query_dicts(sql, params)


async def count(ch: ClickHouse, project_id: str, filters: LogFilters) -> int:
    where, params = where_clause(project_id, filters)
    rows = await ch.query_rows(f"SELECT count() FROM {ch.database}.{TABLE} FINAL WHERE {where}", params)
    return int(rows[0][0])


async def get(ch: ClickHouse, project_id: str, log_id: str) -> dict | None:
    sql = (
        f"SELECT * FROM {ch.database}.{TABLE} FINAL "
        "WHERE project_id = {project_id:String} AND log_id = {log_id:String}"
    )
    rows = await ch.query_dicts(sql, {"project_id": project_id, "log_id": log_id})
    return rows[0] if rows else None


async def rewrite_metadata(
    ch: ClickHouse, project_id: str, filters: LogFilters, changes: dict[str, str | None]
) -> int:
    """Merge ``changes`` into the metadata of every matching log (``None`` deletes a key).

    Written as a new version of each row in one insert: all matching logs change, or none.
    """
    where, params = where_clause(project_id, filters)
    rows = await ch.query_dicts(f"SELECT * FROM {ch.database}.{TABLE} FINAL WHERE {where}", params)
    if not rows:
        return 0
    version = time.time_ns()
    updated = []
    for row in rows:
        metadata = dict(row["metadata"])
        for key, value in changes.items():
            if value is None:
                metadata.pop(key, None)
            else:
                metadata[key] = value
        row.update(metadata=metadata, version=version)
        updated.append([row[c] for c in COLUMNS])
    await ch.insert(f"{ch.database}.{TABLE}", updated, COLUMNS)
    return len(updated)
