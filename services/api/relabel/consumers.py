"""``relabel.results.v1`` → new entry revisions (committed before the offsets are)."""

from __future__ import annotations

import logging

from faststream import AckPolicy
from faststream.kafka import KafkaBroker
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.api.relabel.service import apply_result
from services.common.events import RELABEL_RESULTS_TOPIC, RelabelResult
from services.common.settings import Settings

log = logging.getLogger(__name__)

RESULTS_GROUP = "api-relabel-results"


def register_results_consumer(
    broker: KafkaBroker, sessions: async_sessionmaker[AsyncSession], settings: Settings
) -> None:
    @broker.subscriber(
        RELABEL_RESULTS_TOPIC,
        group_id=RESULTS_GROUP,
        auto_offset_reset="earliest",
        heartbeat_interval_ms=settings.kafka_heartbeat_ms,
        session_timeout_ms=settings.kafka_session_timeout_ms,
        ack_policy=AckPolicy.NACK_ON_ERROR,
    )
    async def apply_relabel_result(result: RelabelResult) -> None:
        async with sessions.begin() as session:
            applied = await apply_result(session=session, result=result)
        if not applied:
            log.info("relabel result %s already applied; skipped", result.result_id)
