"""``relabel.results.v1`` → new entry revisions (committed before the offsets are).

A result that is not a valid ``RelabelResult`` goes to ``relabel.results.v1.dlq`` with the reason."""

from __future__ import annotations

import logging

from faststream.kafka import KafkaBroker
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.api.relabel.service import apply_result
from services.common.dlq import subscribe_with_dlq
from services.common.events import RELABEL_RESULTS_TOPIC, RelabelResult
from services.common.settings import Settings

log = logging.getLogger(__name__)

RESULTS_GROUP = "api-relabel-results"


def register_results_consumer(
    broker: KafkaBroker, sessions: async_sessionmaker[AsyncSession], settings: Settings
) -> None:
    @subscribe_with_dlq(
        broker, RELABEL_RESULTS_TOPIC, RelabelResult, group_id=RESULTS_GROUP, settings=settings
    )
    async def apply_relabel_result(result: RelabelResult) -> None:
        async with sessions.begin() as session:
            applied = await apply_result(session=session, result=result)
        if not applied:
            log.info("relabel result %s already applied; skipped", result.result_id)
