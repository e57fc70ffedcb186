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

from services.common.clickhouse import ClickHouse

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


# Analytics tables fed from other services' events (services/ingest/analytics.py). Each row is keyed
# by its event's stable id, so a re-delivered event collapses into one row (read with FINAL).
JUDGEMENTS_DDL = """
CREATE TABLE IF NOT EXISTS {db}.judgements (
    project_id LowCardinality(String),
    judgement_id String,
    criterion String,
    criterion_version UInt32,
    model LowCardinality(String),
    source LowCardinality(String),
    status LowCardinality(String),
    score Float64,
    judgement Nullable(String),
    explanation String CODEC(ZSTD(3)),
    error_code Nullable(String),
    prompt_tokens UInt32,
    completion_tokens UInt32,
    cost_usd Nullable(Float64),
    latency_ms Int64,
    created_at_ms Int64,
    ingested_at_ms Int64
) ENGINE = ReplacingMergeTree(ingested_at_ms)
ORDER BY (project_id, judgement_id)
SETTINGS non_replicated_deduplication_window = 10000
"""

# One row per model output (kind 'output') and per evaluator verdict (kind 'score') of an eval row.
EVAL_RESULTS_DDL = """
CREATE TABLE IF NOT EXISTS {db}.eval_results (
    project_id LowCardinality(String),
    eval_id String,
    event_id String,
    entry_id String,
    kind LowCardinality(String),
    model LowCardinality(String),
    evaluator String,
    opponent String,
    score Nullable(Float64),
    winner Nullable(String),
    explanation Nullable(String) CODEC(ZSTD(3)),
    output_key String,
    output String CODEC(ZSTD(3)),
    reused UInt8,
    error Nullable(String),
    prompt_tokens UInt32,
    completion_tokens UInt32,
    judge_calls UInt32,
    cost_usd Nullable(Float64),
    latency_ms Int64,
    created_at_ms Int64,
    ingested_at_ms Int64
) ENGINE = ReplacingMergeTree(ingested_at_ms)
ORDER BY (project_id, eval_id, entry_id, kind, model, evaluator, opponent)
SETTINGS non_replicated_deduplication_window = 10000
"""


async def create_schema(ch: ClickHouse) -> None:
    await ch.command(f"CREATE DATABASE IF NOT EXISTS {ch.database}")
    await ch.command(DDL.format(db=ch.database))
    await ch.command(JUDGEMENTS_DDL.format(db=ch.database))
    await ch.command(EVAL_RESULTS_DDL.format(db=ch.database))


def dedup_token(rows: list[list[Any]]) -> str:
    """Same rows → same token, so a retried insert of the same batch is dropped by ClickHouse."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(f"{row[0]}/{row[1]}/{row[2]};".encode())
    return digest.hexdigest()


async def insert_rows(ch: ClickHouse, rows: list[list[Any]], *, give_up_after: float = 0.0) -> None:
    """Insert log rows, retrying for up to ``give_up_after`` seconds while ClickHouse fails."""
    await ch.insert_retrying(
        f"{ch.database}.{TABLE}",
        rows,
        COLUMNS,
        give_up_after=give_up_after,
        settings={"insert_deduplication_token": dedup_token(rows)},
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


def _page_query(
    ch: ClickHouse, project_id: str, filters: LogFilters, columns: str, limit: int, before_id: str | None
) -> tuple[str, dict[str, Any]]:
    """Newest first (log ids are time-ordered); ``before_id`` is the pagination cursor."""
    where, params = where_clause(project_id, filters)
    if before_id:
        where += " AND log_id < {before_id:String}"
        params["before_id"] = before_id
    params["limit"] = limit
    sql = (
        f"SELECT {columns} FROM {ch.database}.{TABLE} FINAL WHERE {where} "
        "ORDER BY log_id DESC LIMIT {limit:UInt32}"
    )
    return sql, params


async def search(
    ch: ClickHouse, project_id: str, filters: LogFilters, *, limit: int, before_id: str | None = None
) -> list[dict]:
    """A page of whole stored rows, newest first."""
    return await ch.query_dicts(*_page_query(ch, project_id, filters, "*", limit, before_id))


async def search_selected(
    ch: ClickHouse,
    project_id: str,
    filters: LogFilters,
    columns: str,
    *,
    limit: int,
    before_id: str | None = None,
) -> list[tuple]:
    """As :func:`search`, but only the ``columns`` expressions, as tuples (no per-row dicts);
    the first column must be ``log_id``, the cursor for the next page."""
    return await ch.query_rows(*_page_query(ch, project_id, filters, columns, limit, before_id))


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
