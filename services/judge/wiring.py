"""One judge per process: criteria materialized from ``catalog.v1`` and verdicts published on
``judgements.v1``. The judge service and the router's best-of-N build it the same way; only how the
judge model is called differs (the router's ChatService in process, or gRPC ``Inference``)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from confluent_kafka import KafkaException

from services.common.events import JUDGEMENTS_TOPIC, JudgementEvent, flat_event_json
from services.common.kafka import AckedProducer
from services.judge.criteria import CriteriaCatalog, catalog_sync
from services.judge.service import Judge, ModelCaller

if TYPE_CHECKING:
    from services.platform import Platform

log = logging.getLogger(__name__)

JSON_HEADERS = [("content-type", b"application/json")]
# Verdicts are published off the answer path, so nobody waits for their batch: sent in a few
# produce requests a second rather than one per verdict or two. With librdkafka's 5 ms, 320
# verdicts/s made ~200 requests/s, and the broker's work and the ack hand-offs doubled the
# judge's tail latency (bench/judge.py, c=64 overhead p99 12.3 -> 8.2 ms).
RECORD_LINGER_MS = 100


def build_judge(platform: Platform, caller: ModelCaller) -> tuple[CriteriaCatalog, Judge]:
    settings = platform.settings
    catalog = CriteriaCatalog(sync=catalog_sync(platform.catalog))
    platform.catalog.handlers.append(catalog.apply)

    # librdkafka, not the framework's publisher: FastStream's publish was ~8 % of a verdict's CPU.
    producer = AckedProducer(
        settings.kafka_url, timeout=settings.publish_timeout_seconds, linger_ms=RECORD_LINGER_MS
    )

    def record(event: JudgementEvent) -> None:
        """Off the answer path: nobody waits for the ack (stopping the producer flushes)."""

        def not_recorded(error: object) -> None:
            log.warning("judgement %s not recorded: %s", event.judgement_id, error)

        try:
            producer.send_nowait(
                JUDGEMENTS_TOPIC,
                flat_event_json(event),
                key=event.project_id.encode(),
                headers=JSON_HEADERS,
                on_failed=not_recorded,
            )
        except KafkaException as exc:  # librdkafka's queue is full
            not_recorded(exc)

    platform.on_started.append(producer.start)
    platform.on_stopping.append(producer.stop)
    judge = Judge(
        caller,
        max_concurrency=settings.judge_project_max_concurrency,
        max_attempts=settings.judge_max_attempts,
        recorder=record,
    )
    return catalog, judge
