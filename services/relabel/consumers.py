"""``relabel.requests.v1`` → new outputs on ``relabel.results.v1``, with bounded concurrency.

A batch is acknowledged only after every result in it has been published; a crash
re-delivers the batch and the api ignores results it has already applied. A request that is
not a valid ``RelabelRequest`` goes to ``relabel.requests.v1.dlq`` with the reason.
"""

from __future__ import annotations

import asyncio
import logging

from faststream.kafka import KafkaBroker

from services.common.dlq import subscribe_with_dlq
from services.common.events import RELABEL_REQUESTS_TOPIC, RELABEL_RESULTS_TOPIC, RelabelRequest
from services.common.inference_client import InferenceClient
from services.common.settings import Settings
from services.relabel.service import relabel_item

log = logging.getLogger(__name__)

WORKER_GROUP = "relabel-workers"


def register_relabel_worker(broker: KafkaBroker, client: InferenceClient, settings: Settings) -> None:
    slots = asyncio.Semaphore(settings.relabel_concurrency)

    @subscribe_with_dlq(
        broker,
        RELABEL_REQUESTS_TOPIC,
        RelabelRequest,
        group_id=WORKER_GROUP,
        settings=settings,
        max_poll_interval_ms=30 * 60 * 1000,  # a batch of slow model calls may take minutes
    )
    async def relabel_batch(batch: RelabelRequest) -> None:
        async def one(item):  # type: ignore[no-untyped-def]
            async with slots:
                result = await relabel_item(client, batch, item)
            await broker.publish(
                result.model_dump(mode="json"), RELABEL_RESULTS_TOPIC, key=batch.job_id.encode()
            )

        await asyncio.gather(*(one(item) for item in batch.items))
        log.info("relabeled batch %s (%d entries) with %s", batch.request_id, len(batch.items), batch.model)
