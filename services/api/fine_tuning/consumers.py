"""``training.events.v1`` → job status, events, checkpoints and the Model (committed before the offset).

Each event is applied once: the job remembers the newest ``seq`` it applied. An event that can
never be applied (not a TrainingEvent, an unknown job, another project's job) goes to
``training.events.v1.dlq`` with the reason; anything else that fails (database or broker down) is
retried until it succeeds, so no status is lost.
"""

from __future__ import annotations

import logging

from faststream.kafka import KafkaBroker
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.api.fine_tuning import service
from services.common import metrics
from services.common.catalog import CatalogReader
from services.common.dlq import PoisonMessage, subscribe_with_dlq
from services.common.events import TRAINING_EVENTS_TOPIC, TrainingEvent
from services.common.settings import Settings

log = logging.getLogger(__name__)

EVENTS_GROUP = "api-training-events"


def register_events_consumer(
    broker: KafkaBroker,
    sessions: async_sessionmaker[AsyncSession],
    settings: Settings,
    local: CatalogReader | None = None,
) -> None:
    """``local``: this process's catalog view, handed each committed model record (read your writes)."""

    @subscribe_with_dlq(
        broker,
        TRAINING_EVENTS_TOPIC,
        TrainingEvent,
        group_id=EVENTS_GROUP,
        settings=settings,
        retry_seconds=None,
    )
    async def apply_training_event(event: TrainingEvent) -> None:
        try:
            async with sessions.begin() as session:
                records = await service.apply_event(session=session, event=event)
                if records:  # before the commit: a refused publish rolls the event back (retried)
                    await service.publish_records(
                        broker=broker, records=records, timeout=settings.publish_timeout_seconds
                    )
        except service.PoisonEvent as exc:
            raise PoisonMessage(str(exc)) from None
        service.apply_locally(local, records or [])
        if records is None:
            log.info("training event %s (seq %d) already applied; skipped", event.event_id, event.seq)
        else:
            metrics.observe_training_event(event)
