"""``training.events.v1`` → job status, events, checkpoints and the Model (committed before the offset).

Each event is applied once: the job remembers the newest ``seq`` it applied. An event that can
never be applied (not JSON, not a TrainingEvent, an unknown job, another project's job) goes to
``training.events.v1.dlq`` with the reason; anything else that fails (database or broker down) is
not acknowledged and comes again.
"""

from __future__ import annotations

import logging
import time

from aiokafka import ConsumerRecord
from faststream import AckPolicy
from faststream.kafka import KafkaBroker, KafkaMessage
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.api.fine_tuning import service
from services.common.events import TRAINING_EVENTS_TOPIC, DeadLetter, TrainingEvent, dlq_topic
from services.common.settings import Settings

log = logging.getLogger(__name__)

EVENTS_GROUP = "api-training-events"


def dead_letter(record: ConsumerRecord, reason: str) -> DeadLetter:
    value = record.value or b""
    return DeadLetter(
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        reason=reason[:2000],
        key=record.key.decode(errors="replace") if record.key else None,
        payload=value.decode(errors="replace"),
        failed_at=int(time.time() * 1000),
    )


async def _raw(_msg: object) -> None:
    """Decode in the handler, so a poison message reaches it (and the DLQ) instead of failing forever."""
    return None


def register_events_consumer(
    broker: KafkaBroker, sessions: async_sessionmaker[AsyncSession], settings: Settings
) -> None:
    async def park(record: ConsumerRecord, reason: str) -> None:
        letter = dead_letter(record, reason)
        await broker.publish(
            letter.model_dump(mode="json"),
            dlq_topic(TRAINING_EVENTS_TOPIC),
            key=letter.key and letter.key.encode(),
        )
        log.error(
            "training event at %s/%d@%d sent to DLQ: %s",
            record.topic,
            record.partition,
            record.offset,
            reason,
        )

    @broker.subscriber(
        TRAINING_EVENTS_TOPIC,
        group_id=EVENTS_GROUP,
        auto_offset_reset="earliest",
        heartbeat_interval_ms=settings.kafka_heartbeat_ms,
        session_timeout_ms=settings.kafka_session_timeout_ms,
        ack_policy=AckPolicy.NACK_ON_ERROR,
        decoder=_raw,
    )
    async def apply_training_event(msg: KafkaMessage) -> None:
        record: ConsumerRecord = msg.raw_message  # type: ignore[assignment]
        try:
            event = TrainingEvent.model_validate_json(record.value or b"")
        except ValidationError as exc:
            await park(
                record, f"not a TrainingEvent: {exc.errors()[0].get('msg')} at {exc.errors()[0].get('loc')}"
            )
            return
        try:
            async with sessions.begin() as session:
                records = await service.apply_event(session=session, event=event)
                if records:
                    await service.publish_records(
                        broker=broker, records=records, timeout=settings.publish_timeout_seconds
                    )
        except service.PoisonEvent as exc:
            await park(record, str(exc))
            return
        if records is None:
            log.info("training event %s (seq %d) already applied; skipped", event.event_id, event.seq)
