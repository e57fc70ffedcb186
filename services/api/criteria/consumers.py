"""``judgements.v1`` → the ``criterion_judgements`` table, in batches (committed before the offsets).

A record that is not a valid ``JudgementEvent`` goes to ``judgements.v1.dlq`` with the reason; a
database failure nacks the batch, which is read again (stored judgements are skipped by id).
"""

from __future__ import annotations

from aiokafka import ConsumerRecord
from faststream import AckPolicy
from faststream.kafka import KafkaBroker, KafkaMessage
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.api.criteria.service import store_judgements
from services.common.dlq import dead_letter, publish_dead_letter, raw_records
from services.common.events import JUDGEMENTS_TOPIC, DeadLetter, JudgementEvent
from services.common.settings import Settings

JUDGEMENTS_GROUP = "api-judgements"


def decode(records: tuple[ConsumerRecord, ...]) -> tuple[list[JudgementEvent], list[DeadLetter]]:
    events, dead = [], []
    for record in records:
        try:
            events.append(JudgementEvent.model_validate_json(record.value or b""))
        except ValidationError as exc:
            first = exc.errors()[0]
            dead.append(dead_letter(record, f"not a JudgementEvent: {first.get('loc')}: {first.get('msg')}"))
    return events, dead


def register_judgements_consumer(
    broker: KafkaBroker, sessions: async_sessionmaker[AsyncSession], settings: Settings
) -> None:
    @broker.subscriber(
        JUDGEMENTS_TOPIC,
        batch=True,
        group_id=JUDGEMENTS_GROUP,
        auto_offset_reset="earliest",
        max_records=500,
        batch_timeout_ms=200,
        # A few larger transactions a second rather than one per handful of verdicts (~10 % of the
        # platform's CPU per judgement at c=16-64, judge.py).
        fetch_min_bytes=settings.log_fetch_min_bytes,
        fetch_max_wait_ms=200,
        heartbeat_interval_ms=settings.kafka_heartbeat_ms,
        session_timeout_ms=settings.kafka_session_timeout_ms,
        ack_policy=AckPolicy.NACK_ON_ERROR,
        decoder=raw_records,
    )
    async def store(msg: KafkaMessage) -> None:
        records: tuple[ConsumerRecord, ...] = msg.raw_message  # type: ignore[assignment]
        events, dead = decode(records)
        for letter in dead:
            await publish_dead_letter(broker, letter)
        if events:
            async with sessions.begin() as session:
                await store_judgements(session=session, events=events)
