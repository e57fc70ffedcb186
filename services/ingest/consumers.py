"""The ClickHouse writer: ``logs.v1`` → ``request_logs`` in batches.

A batch's offsets are committed only after its insert succeeds; while it is being inserted the
consumer already fetches and decodes the next one (``InsertPipeline``). While ClickHouse is down
the insert retries with backoff, so consumption pauses; past ``log_insert_retry_seconds`` the
batch's partitions are rewound (nothing committed) and it is consumed again. Re-delivered logs
collapse by log id.
Messages that can never be written go to ``logs.v1.dlq`` with the reason: invalid events, events
whose Kafka key is not their ``project_id``, and events for a project that does not exist.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any

from aiokafka import ConsumerRecord, TopicPartition
from faststream import AckPolicy
from faststream.kafka import KafkaBroker, KafkaMessage
from pydantic import ValidationError

from services.common import metrics, tracing
from services.common.auth import KeyRing
from services.common.catalog import CatalogReader
from services.common.clickhouse import ClickHouse
from services.common.dlq import dead_letter, publish_dead_letter, raw_records
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


@dataclass(frozen=True)
class BatchOffsets:
    first: dict[TopicPartition, int]  # each partition's earliest record in the batch
    after: dict[TopicPartition, int]  # the offset to commit once the batch is written

    @classmethod
    def of(cls, records: tuple[ConsumerRecord, ...]) -> BatchOffsets:
        first: dict[TopicPartition, int] = {}
        after: dict[TopicPartition, int] = {}
        for record in records:
            tp = TopicPartition(record.topic, record.partition)
            first[tp] = min(first.get(tp, record.offset), record.offset)
            after[tp] = max(after.get(tp, 0), record.offset + 1)
        return cls(first, after)


class InsertPipeline:
    """One consumer's insert in flight while it fetches and decodes its next batch.

    Each batch commits its own offsets once its insert has succeeded, and the next batch's insert
    starts only after that, so commits stay in order and a crash at any point leaves uncommitted
    exactly the batches not yet written (read again, they collapse by log id). An insert that
    finally fails rewinds its partitions to the batch's first offsets; a batch fetched before the
    rewind starts past that point and is dropped when it arrives, to be read again in order.
    """

    def __init__(self) -> None:
        self._pending: asyncio.Task | None = None
        self._rewound: dict[TopicPartition, int] = {}
        self._closing = False

    async def wait(self) -> None:
        """Until the insert in flight has committed or rewound."""
        if self._pending is not None:
            await asyncio.wait({self._pending})

    def stale(self, batch: BatchOffsets) -> bool:
        """Fetched before a rewind of one of its partitions."""
        for tp, first in batch.first.items():
            rewound = self._rewound.get(tp)
            if rewound is not None and first > rewound:
                return True
        for tp in batch.first:
            self._rewound.pop(tp, None)
        return False

    async def submit(self, consumer: Any, batch: BatchOffsets, write: Callable[[], Awaitable[None]]) -> None:
        job = self._write_then_commit(consumer, batch, write)
        if self._closing:
            await job
        else:
            self._pending = asyncio.create_task(job)

    async def close(self) -> None:
        """From now on each batch is written and committed before its handler returns."""
        self._closing = True
        await self.wait()

    async def _write_then_commit(
        self, consumer: Any, batch: BatchOffsets, write: Callable[[], Awaitable[None]]
    ) -> None:
        try:
            await write()
        except BaseException as exc:
            log.error("log batch not written (%s: %s); reading it again", type(exc).__name__, exc)
            self._rewind(consumer, batch)
            if not isinstance(exc, Exception):
                raise
            return
        try:
            await consumer.commit(batch.after)
        except Exception as exc:  # a rebalance took the partitions: the new owner reads them again
            log.warning("commit of a written log batch failed (%s); it will collapse when re-read", exc)

    def _rewind(self, consumer: Any, batch: BatchOffsets) -> None:
        for tp, offset in batch.first.items():
            try:
                consumer.seek(tp, offset)
            except Exception:  # no longer assigned to this consumer: its new owner reads it
                continue
            self._rewound[tp] = offset


def register_log_writer(
    broker: KafkaBroker,
    ch: ClickHouse,
    settings: Settings,
    *,
    topic: str = LOGS_TOPIC,
    group_id: str = WRITER_GROUP,
    projects: KnownProjects | None = None,
) -> InsertPipeline:
    """``projects``: when given, events for a project id that does not exist are dead-lettered.

    Returns the writer's pipeline: ``close()`` it before the broker stops, so the last batch is
    written and committed rather than read again after a restart.
    """
    pipeline = InsertPipeline()

    @broker.subscriber(
        topic,
        batch=True,
        group_id=group_id,
        auto_offset_reset="earliest",
        max_records=settings.log_batch_max_rows,
        batch_timeout_ms=settings.log_batch_max_ms,
        fetch_min_bytes=settings.log_fetch_min_bytes,
        fetch_max_wait_ms=settings.log_batch_max_ms,
        max_partition_fetch_bytes=8 * 1024 * 1024,
        heartbeat_interval_ms=settings.kafka_heartbeat_ms,
        session_timeout_ms=settings.kafka_session_timeout_ms,
        ack_policy=AckPolicy.MANUAL,  # InsertPipeline commits each batch once it is written
        decoder=raw_records,  # parsed here, poison included (FastStream would parse each twice)
    )
    async def write_logs(msg: KafkaMessage) -> None:
        records: tuple[ConsumerRecord, ...] = msg.raw_message  # type: ignore[assignment]
        await pipeline.wait()
        batch = BatchOffsets.of(records)
        if pipeline.stale(batch):
            return
        try:
            rows = await _rows_or_dead_letters(broker, records, topic, projects)
        except Exception:
            await msg.nack()  # its dead letters could not be parked: read it again, skip nothing
            raise

        async def write() -> None:
            if rows:
                with tracing.consumed_batch(f"{topic} write", records, **{"db.system": "clickhouse"}):
                    await store.insert_rows(ch, rows, give_up_after=settings.log_insert_retry_seconds)
                metrics.INGEST_WRITTEN.inc(len(rows))
                metrics.observe_end_to_end_lag(record.timestamp for record in records)
            metrics.observe_consumer_lag(msg.consumer, batch.after, group_id)

        await pipeline.submit(msg.consumer, batch, write)

    return pipeline


async def _rows_or_dead_letters(
    broker: KafkaBroker,
    records: tuple[ConsumerRecord, ...],
    topic: str,
    projects: KnownProjects | None,
) -> list[list]:
    """The batch's rows to insert; what can never be written is published to the DLQ first."""
    events, dead = decode_records(records)
    unknown = await projects.unknown({e.project_id for _, e in events}) if projects else set()
    rows, unwritable = rows_from_events(events, unknown)
    for letter in dead + unwritable:
        await publish_dead_letter(broker, letter)
        metrics.INGEST_DLQ.labels(dlq_topic(topic)).inc()
    return rows
