"""``training.requests.v1`` → the training backend (one handler for start, cancel, pause and resume).

A request is acknowledged once the backend has made it durable (a job folder locally, a Job in
Kubernetes), not when training ends: training takes hours and a cancel for the same job travels on
the same partition behind its start. A message that can never be applied (not JSON, not a
TrainingRequest, a malformed job id) goes to ``training.requests.v1.dlq`` with the reason;
anything else that fails is not acknowledged and comes again.
"""

from __future__ import annotations

import logging
from typing import Protocol

from aiokafka import ConsumerRecord
from faststream import AckPolicy
from faststream.kafka import KafkaBroker, KafkaMessage
from pydantic import ValidationError

from services.common.dlq import dead_letter
from services.common.events import TRAINING_REQUESTS_TOPIC, TrainingRequest, dlq_topic
from services.common.settings import Settings

log = logging.getLogger(__name__)

TRAINER_GROUP = "trainer"


class Backend(Protocol):
    async def handle(self, request: TrainingRequest) -> None: ...


async def _raw(_msg: object) -> None:
    """Decode in the handler, so a poison message reaches it (and the DLQ) instead of failing forever."""
    return None


def register_trainer(broker: KafkaBroker, backend: Backend, settings: Settings) -> None:
    async def park(record: ConsumerRecord, reason: str) -> None:
        letter = dead_letter(record, reason)
        await broker.publish(
            letter.model_dump(mode="json"),
            dlq_topic(TRAINING_REQUESTS_TOPIC),
            key=letter.key and letter.key.encode(),
        )
        log.error(
            "training request at %s/%d@%d sent to DLQ: %s",
            record.topic,
            record.partition,
            record.offset,
            reason,
        )

    @broker.subscriber(
        TRAINING_REQUESTS_TOPIC,
        group_id=TRAINER_GROUP,
        auto_offset_reset="earliest",
        heartbeat_interval_ms=settings.kafka_heartbeat_ms,
        session_timeout_ms=settings.kafka_session_timeout_ms,
        ack_policy=AckPolicy.NACK_ON_ERROR,
        decoder=_raw,
    )
    async def training_request(msg: KafkaMessage) -> None:
        record: ConsumerRecord = msg.raw_message  # type: ignore[assignment]
        try:
            request = TrainingRequest.model_validate_json(record.value or b"")
        except ValidationError as exc:
            first = exc.errors()[0]
            await park(record, f"not a TrainingRequest: {first.get('msg')} at {first.get('loc')}")
            return
        try:
            await backend.handle(request)
        except ValueError as exc:
            await park(record, str(exc))
            return
        log.info(
            "training request %s (%s) accepted for job %s", request.request_id, request.action, request.job_id
        )
