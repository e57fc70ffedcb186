"""Analytics writers: ``judgements.v1`` → ``judgements`` and ``eval.events.v1`` → ``eval_results``.

ClickHouse has one owner (this service), so the judge's verdicts and the eval service's outputs and
scores reach it as events; the api keeps its own catalog copies for its paging APIs. Each topic has
its own consumer group and batch subscriber: invalid records go to ``<topic>.dlq`` with the reason,
the rest are inserted in one batch, and the offsets are committed only after the insert succeeded
(while ClickHouse is down the batch is retried, then nacked and consumed again). Rows are keyed by
the event's stable id (tables in ``store.py``), so a re-delivered event is stored once.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import orjson
from aiokafka import ConsumerRecord
from faststream import AckPolicy
from faststream.kafka import KafkaBroker, KafkaMessage
from pydantic import BaseModel, ValidationError

from services.common.clickhouse import ClickHouse
from services.common.dlq import dead_letter, publish_dead_letter, raw_records, validation_reason
from services.common.events import EVAL_EVENTS_TOPIC, JUDGEMENTS_TOPIC, EvalEvent, JudgementEvent
from services.common.settings import Settings

log = logging.getLogger(__name__)

# Records decoded and made rows at a time on the event loop, which serves requests in between.
DECODE_SLICE = 64

JUDGEMENTS_GROUP = "ingest-clickhouse-judgements"
EVALS_GROUP = "ingest-clickhouse-evals"

JUDGEMENT_COLUMNS: tuple[str, ...] = (
    "project_id",
    "judgement_id",
    "criterion",
    "criterion_version",
    "model",
    "source",
    "status",
    "score",
    "judgement",
    "explanation",
    "error_code",
    "prompt_tokens",
    "completion_tokens",
    "cost_usd",
    "latency_ms",
    "created_at_ms",
    "ingested_at_ms",
)

EVAL_RESULT_COLUMNS: tuple[str, ...] = (
    "project_id",
    "eval_id",
    "event_id",
    "entry_id",
    "kind",
    "model",
    "evaluator",
    "opponent",
    "score",
    "winner",
    "explanation",
    "output_key",
    "output",
    "reused",
    "error",
    "prompt_tokens",
    "completion_tokens",
    "judge_calls",
    "cost_usd",
    "latency_ms",
    "created_at_ms",
    "ingested_at_ms",
)

E = TypeVar("E", bound=BaseModel)


def judgement_rows(event: JudgementEvent, now_ms: int) -> list[list[Any]]:
    return [
        [
            event.project_id,
            event.judgement_id,
            event.criterion,
            event.criterion_version,
            event.model,
            event.source,
            event.status,
            event.score,
            event.judgement,
            event.explanation,
            event.error_code,
            event.prompt_tokens,
            event.completion_tokens,
            event.cost_usd,
            event.latency_ms,
            event.created_at,
            now_ms,
        ]
    ]


def eval_rows(event: EvalEvent, now_ms: int) -> list[list[Any]]:
    """A row event's outputs and scores as rows; a status event has none (the api tracks status)."""
    if event.type != "row":
        return []
    entry = event.entry_id or ""
    created = event.created_at or now_ms
    rows: list[list[Any]] = []
    for out in event.outputs:
        output = orjson.dumps(out.output).decode() if out.output is not None else ""
        rows.append(
            [
                event.project_id, event.eval_id, event.event_id, entry, "output", out.model, "", "",
                None, None, None, out.output_key, output, int(out.reused), out.error,
                out.prompt_tokens, out.completion_tokens, 0, out.cost_usd, out.latency_ms, created, now_ms,
            ]
        )  # fmt: skip
    for score in event.scores:
        rows.append(
            [
                event.project_id, event.eval_id, event.event_id, entry, "score", score.model,
                score.evaluator, score.opponent, score.score, score.winner, score.explanation, "", "", 0,
                score.error, 0, 0, score.judge_calls, score.cost_usd, 0, created, now_ms,
            ]
        )  # fmt: skip
    return rows


def decode(records: Sequence[ConsumerRecord], model: type[E]) -> tuple[list[E], list]:
    """Each record as a ``model`` event, or a dead letter saying why it is not one."""
    events, dead = [], []
    for record in records:
        try:
            events.append(model.model_validate_json(record.value or b""))
        except ValidationError as exc:
            dead.append(dead_letter(record, validation_reason(model, exc)))
    return events, dead


def distinct_rows(rows: list[list[Any]], key_width: int) -> tuple[list[list[Any]], str]:
    """The batch's distinct rows in a canonical order, and their dedup token (the first
    ``key_width`` columns: all but the time of the try). A batch holding the same events as an
    earlier one, in whatever order or repeated, gets the same rows and token, so ClickHouse drops
    its insert rather than storing the events again until a merge collapses them."""
    keyed = {"/".join(str(v) for v in row[:key_width]): row for row in rows}
    keys = sorted(keyed)
    digest = hashlib.sha256()
    for key in keys:
        digest.update((key + ";").encode())
    return [keyed[key] for key in keys], digest.hexdigest()


def _register(
    broker: KafkaBroker,
    ch: ClickHouse,
    settings: Settings,
    *,
    topic: str,
    group_id: str,
    model: type[E],
    to_rows: Callable[[E, int], list[list[Any]]],
    table: str,
    columns: Sequence[str],
) -> None:
    async def write(msg: KafkaMessage) -> None:
        records: tuple[ConsumerRecord, ...] = msg.raw_message  # type: ignore[assignment]
        now_ms = int(time.time() * 1000)
        rows, dead = [], []
        for start in range(0, len(records), DECODE_SLICE):
            if start:
                await asyncio.sleep(0)  # requests run between slices of a large batch
            events, dead_in_slice = decode(records[start : start + DECODE_SLICE], model)
            rows += [row for event in events for row in to_rows(event, now_ms)]
            dead += dead_in_slice
        for letter in dead:
            await publish_dead_letter(broker, letter)
        if rows:
            rows, token = distinct_rows(rows, len(columns) - 1)  # all columns but ingested_at_ms
            await ch.insert_retrying(
                f"{ch.database}.{table}",
                rows,
                columns,
                give_up_after=settings.log_insert_retry_seconds,
                settings={"insert_deduplication_token": f"{table}:{token}"},
            )

    write.__name__ = write.__qualname__ = f"write_{table}"
    broker.subscriber(
        topic,
        batch=True,
        group_id=group_id,
        auto_offset_reset="earliest",
        max_records=settings.log_batch_max_rows,
        batch_timeout_ms=settings.log_batch_max_ms,
        fetch_min_bytes=settings.log_fetch_min_bytes,  # fewer, larger inserts, as the log writer
        fetch_max_wait_ms=settings.log_batch_max_ms,
        heartbeat_interval_ms=settings.kafka_heartbeat_ms,
        session_timeout_ms=settings.kafka_session_timeout_ms,
        ack_policy=AckPolicy.NACK_ON_ERROR,
        decoder=raw_records,
    )(write)


def register_analytics_writers(broker: KafkaBroker, ch: ClickHouse, settings: Settings) -> None:
    """The ``judgements`` and ``eval_results`` writers, each with its own consumer group."""
    _register(
        broker,
        ch,
        settings,
        topic=JUDGEMENTS_TOPIC,
        group_id=JUDGEMENTS_GROUP,
        model=JudgementEvent,
        to_rows=judgement_rows,
        table="judgements",
        columns=JUDGEMENT_COLUMNS,
    )
    _register(
        broker,
        ch,
        settings,
        topic=EVAL_EVENTS_TOPIC,
        group_id=EVALS_GROUP,
        model=EvalEvent,
        to_rows=eval_rows,
        table="eval_results",
        columns=EVAL_RESULT_COLUMNS,
    )
