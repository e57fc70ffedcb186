"""``eval.requests.v1`` → per-row results on ``eval.events.v1``.

A batch is acknowledged only after every row's event is published; a crash re-delivers the batch,
the router's response cache answers the model calls it already made, and the api ignores events
it has already applied. A message that is not an EvalRequest goes to ``eval.requests.v1.dlq``.
"""

from __future__ import annotations

import logging

from aiokafka import ConsumerRecord
from faststream import AckPolicy
from faststream.kafka import KafkaBroker, KafkaMessage
from pydantic import ValidationError

from services.common import metrics
from services.common.dlq import dead_letter
from services.common.events import (
    EVAL_EVENTS_TOPIC,
    EVAL_REQUESTS_TOPIC,
    EvalEvent,
    EvalRequest,
    dlq_topic,
)
from services.common.settings import Settings
from services.eval.service import EvalWorker

log = logging.getLogger(__name__)

WORKER_GROUP = "eval-workers"


async def _raw(_msg: object) -> None:
    """Decode in the handler, so a poison message reaches the DLQ instead of failing forever."""
    return None


def register_eval_worker(broker: KafkaBroker, worker: EvalWorker, settings: Settings) -> None:
    async def publish(event: EvalEvent) -> None:
        await broker.publish(event.model_dump(mode="json"), EVAL_EVENTS_TOPIC, key=event.eval_id.encode())
        if event.type == "row":
            metrics.EVAL_ROWS.labels("scored" if event.scores else "unscored").inc()

    @broker.subscriber(
        EVAL_REQUESTS_TOPIC,
        group_id=WORKER_GROUP,
        auto_offset_reset="earliest",
        heartbeat_interval_ms=settings.kafka_heartbeat_ms,
        session_timeout_ms=settings.kafka_session_timeout_ms,
        max_poll_interval_ms=30 * 60 * 1000,  # a batch of slow model calls may take minutes
        ack_policy=AckPolicy.NACK_ON_ERROR,
        decoder=_raw,
    )
    async def evaluate_batch(msg: KafkaMessage) -> None:
        record: ConsumerRecord = msg.raw_message  # type: ignore[assignment]
        try:
            request = EvalRequest.model_validate_json(record.value or b"")
        except ValidationError as exc:
            first = exc.errors()[0]
            letter = dead_letter(record, f"not an EvalRequest: {first.get('msg')} at {first.get('loc')}")
            await broker.publish(
                letter.model_dump(mode="json"), dlq_topic(EVAL_REQUESTS_TOPIC), key=record.key
            )
            log.error("eval request at %s@%d sent to the DLQ: %s", record.topic, record.offset, letter.reason)
            return
        try:
            await worker.handle(request, publish)
        except Exception:
            log.exception("eval batch %s failed; it will be consumed again", request.request_id)
            raise
        log.info("evaluated batch %s (%d rows)", request.request_id, len(request.rows))
