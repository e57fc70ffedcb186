"""``eval.events.v1`` → stored outputs, scores and progress (committed before the offsets are)."""

from __future__ import annotations

import logging

from faststream import AckPolicy
from faststream.kafka import KafkaBroker
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.api.evals.service import apply_event
from services.common.events import EVAL_EVENTS_TOPIC, EvalEvent
from services.common.settings import Settings

log = logging.getLogger(__name__)

EVENTS_GROUP = "api-eval-events"


def register_events_consumer(
    broker: KafkaBroker, sessions: async_sessionmaker[AsyncSession], settings: Settings
) -> None:
    @broker.subscriber(
        EVAL_EVENTS_TOPIC,
        group_id=EVENTS_GROUP,
        auto_offset_reset="earliest",
        heartbeat_interval_ms=settings.kafka_heartbeat_ms,
        session_timeout_ms=settings.kafka_session_timeout_ms,
        ack_policy=AckPolicy.NACK_ON_ERROR,
    )
    async def apply_eval_event(event: EvalEvent) -> None:
        async with sessions.begin() as session:
            applied = await apply_event(session=session, event=event)
        if not applied:
            log.debug("eval event %s skipped (already applied, or its eval stopped)", event.event_id)
