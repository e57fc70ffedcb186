"""The ClickHouse writer: ``logs.v1`` → ``request_logs`` in batches.

Offsets are committed only after the insert succeeds (FastStream acks a batch when
the handler returns). While ClickHouse is down the handler retries with backoff, so
consumption pauses; past ``log_insert_retry_seconds`` it raises, the batch is nacked
(nothing committed) and consumed again. Re-delivered logs collapse by log id.
Messages that can never be written go to ``logs.v1.dlq`` with the reason: invalid events, events
whose Kafka key is not their ``project_id``, and events for a project that does not exist.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Collection
from dataclasses import dataclass

from aiokafka import ConsumerRecord
from faststream import AckPolicy
from faststream.kafka import KafkaBroker, KafkaMessage
from pydantic import ValidationError

from services.common import metrics, tracing
from services.common.auth import KeyRing
from services.common.catalog import CatalogReader
from services.common.clickhouse import ClickHouse
from services.common.dlq import dead_letter
from services.common.events import LOGS_TOPIC, DeadLetter, dlq_topic
from services.common.settings import Settings
from services.ingest import store
from services.ingest.log_rows import WireLogEvent, decode_log_event, event_to_row

log = logging.getLogger(__name__)

WRITER_GROUP = "ingest-clickhouse-writer"


def decode_records(
    records: tuple[ConsumerRecord, ...],
) -> tuple[list[tuple[ConsumerRecord, WireLogEvent]], list[DeadLetter]]:
    """Each record as a log event, or a dead letter saying why it is not one.

    The Kafka key must be the event's project (or absent): a producer whose key and body disagree
    has a bug that must be visible, not a log stored under a guess.
    """
    events, dead = [], []
    for record in records:
        try:
            event = decode_log_event(record.value or b"")
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ())) or "message"
            dead.append(dead_letter(record, f"invalid log event: {where}: {first.get('msg')}"))
            continue
        key = record.key.decode(errors="replace") if record.key else None
        if key is not None and key != event.project_id:
            dead.append(
                dead_letter(record, f"key mismatch: the Kafka key {key!r} is not the event's project_id")
            )
            continue
        events.append((record, event))
    return events, dead


def rows_from_events(
    events: list[tuple[ConsumerRecord, WireLogEvent]],
    unknown_projects: Collection[str] = (),
) -> tuple[list[list], list[DeadLetter]]:
    rows, dead = [], []
    now_ms = int(time.time() * 1000)
    for record, event in events:
        if event.project_id in unknown_projects:
            dead.append(dead_letter(record, f"unknown project: no project has id {event.project_id!r}"))
            continue
        try:
            rows.append(event_to_row(event, now_ms))
        except Exception as exc:  # a payload the row builder cannot handle
            dead.append(dead_letter(record, f"unprocessable log event: {type(exc).__name__}: {exc}"))
    return rows, dead


@dataclass(frozen=True)
class KnownProjects:
    """Which project ids exist: the keyring, brought up to date from ``catalog.v1`` before an id is
    declared unknown (a project created a moment ago in another process is not unknown)."""

    keyring: KeyRing
    catalog: CatalogReader | None = None

    async def unknown(self, project_ids: set[str]) -> set[str]:
        missing = {p for p in project_ids if not self.keyring.knows_project(p)}
        if missing and self.catalog is not None and await self.catalog.sync():
            missing = {p for p in missing if not self.keyring.knows_project(p)}
        return missing


async def insert_with_retry(ch: ClickHouse, rows: list[list], *, give_up_after: float) -> None:
    delay, deadline = 0.2, time.monotonic() + give_up_after
    while True:
        try:
            await store.insert_rows(ch, rows)
            return
        except Exception as exc:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("ClickHouse insert of %d rows failed (%s); retrying in %.1fs", len(rows), exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


async def _raw_records_only(_msg: object) -> None:
    """The writer parses raw records itself (poison messages included): skip FastStream's decoding,
    which would otherwise parse every record's JSON a second time."""
    return None


def register_log_writer(
    broker: KafkaBroker,
    ch: ClickHouse,
    settings: Settings,
    *,
    topic: str = LOGS_TOPIC,
    group_id: str = WRITER_GROUP,
    projects: KnownProjects | None = None,
) -> None:
    """``projects``: when given, events for a project id that does not exist are dead-lettered."""

    @broker.subscriber(
        topic,
        batch=True,
        group_id=group_id,
        auto_offset_reset="earliest",
        max_records=settings.log_batch_max_rows,
        batch_timeout_ms=settings.log_batch_max_ms,
        fetch_min_bytes=1024 * 1024,
        fetch_max_wait_ms=settings.log_batch_max_ms,
        max_partition_fetch_bytes=8 * 1024 * 1024,
        heartbeat_interval_ms=settings.kafka_heartbeat_ms,
        session_timeout_ms=settings.kafka_session_timeout_ms,
        ack_policy=AckPolicy.NACK_ON_ERROR,
        decoder=_raw_records_only,
    )
    async def write_logs(msg: KafkaMessage) -> None:
        records: tuple[ConsumerRecord, ...] = msg.raw_message  # type: ignore[assignment]
        events, dead = decode_records(records)
        unknown = await projects.unknown({e.project_id for _, e in events}) if projects else set()
        rows, unwritable = rows_from_events(events, unknown)
        dead += unwritable
        for letter in dead:
            await broker.publish(
                letter.model_dump(mode="json"), dlq_topic(topic), key=letter.key and letter.key.encode()
            )
            metrics.INGEST_DLQ.labels(dlq_topic(topic)).inc()
            log.error(
                "log event at %s/%d@%d sent to DLQ: %s",
                letter.topic,
                letter.partition,
                letter.offset,
                letter.reason,
            )
        if rows:
            with tracing.consumed_batch(f"{topic} write", records, **{"db.system": "clickhouse"}):
                await insert_with_retry(ch, rows, give_up_after=settings.log_insert_retry_seconds)
            metrics.INGEST_WRITTEN.inc(len(rows))
            metrics.observe_end_to_end_lag(record.timestamp for record in records)
        metrics.observe_consumer_lag(msg.consumer, records, group_id)
