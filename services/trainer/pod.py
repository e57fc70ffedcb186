"""The training pod of a Kubernetes Job: ``python -m services.trainer.pod``.

The request arrives in ``DISTILLERY_TRAINER_REQUEST`` (JSON); the blob store and Kafka URLs in
the usual ``DISTILLERY_*`` variables (from the Job's Secret). The work folder lives on the
model-store volume (``<trainer_work_dir>/jobs/<job id>``), so a retried pod resumes from the last
checkpoint. The pod relays its own events to ``training.events.v1`` (clock sequence numbers, as
the trainer service also reports on the job) and exits 0 whenever the run reported an outcome.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import sys

from services.common.events import TRAINING_EVENTS_TOPIC, TrainingRequest
from services.common.settings import Settings

log = logging.getLogger(__name__)

REQUEST_ENV = "DISTILLERY_TRAINER_REQUEST"


async def train(request: TrainingRequest, settings: Settings) -> str:
    from services.common.blobstore import blob_store_from_url
    from services.common.kafka import AckedProducer
    from services.trainer.job import EVENTS_FILE, REQUEST_FILE, Run, read_events
    from services.trainer.service import JobFolder, training_event

    folder = JobFolder(settings.resolved_trainer_work_dir() / "jobs" / request.job_id)
    folder.path.mkdir(parents=True, exist_ok=True)
    (folder.path / REQUEST_FILE).write_text(request.model_dump_json())
    producer = AckedProducer(settings.kafka_url)
    await producer.start()

    async def relay() -> None:
        state = folder.state()
        start = int(state.get("relayed", 0))
        for offset, line in enumerate(read_events(folder.path / EVENTS_FILE, start)):
            event = training_event(request, start + offset, line)
            await producer.send_and_wait(
                TRAINING_EVENTS_TOPIC,
                json.dumps(event.model_dump(mode="json")).encode(),
                key=request.job_id.encode(),
            )
            folder.save_state(relayed=start + offset + 1)

    run = Run(
        request,
        folder.path,
        blobs=blob_store_from_url(settings.resolved_blob_url()),
        store_dir=settings.resolved_model_store_dir(),
        clock_seq=True,
        max_steps=settings.trainer_max_steps,
    )
    try:
        await relay()  # what an earlier pod wrote but did not get out
        lock = await asyncio.to_thread(open, folder.path / ".lock", "a+")
        try:
            await asyncio.to_thread(fcntl.flock, lock, fcntl.LOCK_EX)  # an earlier pod still ending
            task = asyncio.create_task(asyncio.to_thread(run.execute))
            while not task.done():
                await asyncio.wait({task}, timeout=1.0)
                await relay()
            status = task.result()
        finally:
            lock.close()
        await relay()
        return status
    finally:
        await producer.stop()


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raw = os.environ.get(REQUEST_ENV)
    if not raw:
        print(f"{REQUEST_ENV} is not set", file=sys.stderr)
        return 2
    request = TrainingRequest.model_validate_json(raw)
    status = asyncio.run(train(request, Settings()))
    log.info("training job %s ended: %s", request.job_id, status)
    return 0


if __name__ == "__main__":
    sys.exit(main())
