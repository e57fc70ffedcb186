"""``eval.events.v1`` → stored outputs, scores and progress (committed before the offsets are).

Events arrive in batches and are applied in one transaction per batch (one per row would make the
catalog's commits the bottleneck of a fast code eval). Each event is applied once
(``eval_applied_events``); one that is not an EvalEvent goes to ``eval.events.v1.dlq``.
"""

from __future__ import annotations

import logging

from aiokafka import ConsumerRecord
from faststream import AckPolicy
from faststream.kafka import KafkaBroker, KafkaMessage
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.api.evals.service import apply_events
from services.common.dlq import dead_letter
from services.common.events import EVAL_EVENTS_TOPIC, EvalEvent, dlq_topic
from services.common.settings import Settings

log = logging.getLogger(__name__)

EVENTS_GROUP = "api-eval-events"
BATCH_RECORDS = 500


async def _raw(_msg: object) -> None:
    """Decode in the handler, so a poison message reaches the DLQ instead of failing forever."""
    return None


def register_events_consumer(
    broker: KafkaBroker, sessions: async_sessionmaker[AsyncSession], settings: Settings
) -> None:
    @broker.subscriber(
        EVAL_EVENTS_TOPIC,
        batch=True,
        max_records=BATCH_RECORDS,
        batch_timeout_ms=100,
        group_id=EVENTS_GROUP,
        auto_offset_reset="earliest",
        heartbeat_interval_ms=settings.kafka_heartbeat_ms,
        session_timeout_ms=settings.kafka_session_timeout_ms,
        ack_policy=AckPolicy.NACK_ON_ERROR,
        decoder=_raw,
    )
    async def apply_eval_events(msg: KafkaMessage) -> None:
        records: tuple[ConsumerRecord, ...] = msg.raw_message  # type: ignore[assignment]
        events: list[EvalEvent] = []
        for record in records:
            try:
                events.append(EvalEvent.model_validate_json(record.value or b""))
            except ValidationError as exc:
                first = exc.errors()[0]
                letter = dead_letter(record, f"not an EvalEvent: {first.get('msg')} at {first.get('loc')}")
                await broker.publish(
                    letter.model_dump(mode="json"), dlq_topic(EVAL_EVENTS_TOPIC), key=record.key
                )
                log.error(
                    "eval event at %s@%d sent to the DLQ: %s", record.topic, record.offset, letter.reason
                )
        if not events:
            return
        try:
            async with sessions.begin() as session:
                applied = await apply_events(session=session, events=events)
        except Exception:
            log.exception("applying %d eval events failed; they will be consumed again", len(events))
            raise
        log.debug("applied %d of %d eval events", applied, len(events))
