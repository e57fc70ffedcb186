"""``judgements.v1`` → the ``criterion_judgements`` table (committed before the offsets are)."""

from __future__ import annotations

from faststream import AckPolicy
from faststream.kafka import KafkaBroker
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.api.criteria.service import store_judgement
from services.common.events import JUDGEMENTS_TOPIC, JudgementEvent
from services.common.settings import Settings

JUDGEMENTS_GROUP = "api-judgements"


def register_judgements_consumer(
    broker: KafkaBroker, sessions: async_sessionmaker[AsyncSession], settings: Settings
) -> None:
    @broker.subscriber(
        JUDGEMENTS_TOPIC,
        group_id=JUDGEMENTS_GROUP,
        auto_offset_reset="earliest",
        heartbeat_interval_ms=settings.kafka_heartbeat_ms,
        session_timeout_ms=settings.kafka_session_timeout_ms,
        ack_policy=AckPolicy.NACK_ON_ERROR,
    )
    async def store(event: JudgementEvent) -> None:
        async with sessions.begin() as session:
            await store_judgement(session=session, event=event)
