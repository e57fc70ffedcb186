"""Helpers for the fine-tuning tests: datasets to train on, reading topics, driving jobs by events."""

from __future__ import annotations

import secrets
import time
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from services.api.fine_tuning import service
from services.common.events import TRAINING_EVENTS_TOPIC, TrainingEvent
from tests.conftest import Project, RunningPlatform, wait_until

TINY = "distillery/tiny-chat"
# A documented base without weights here: a trainer (when one runs) fails it fast instead of training.
ABSENT_BASE = "meta-llama/Llama-3.2-1B-Instruct"


def entry(question: str, answer: str, **extra: Any) -> dict[str, Any]:
    return {
        "messages": [
            {"role": "system", "content": "STATIC PREAMBLE. Answer briefly."},
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ],
        "split": "TRAIN",
        **extra,
    }


def rows(n: int = 6, *, rejected: bool = False) -> list[dict[str, Any]]:
    extra = {"rejected_message": {"role": "assistant", "content": "no idea"}} if rejected else {}
    return [entry(f"What is {i}+{i}?", str(i + i), **extra) for i in range(n)]


async def make_dataset(project: Project, entries: list[dict[str, Any]]) -> str:
    async with project.client() as http:
        dataset = (await http.post("/datasets", json={"name": f"ft-{secrets.token_hex(3)}"})).json()
        if entries:
            created = await http.post(f"/datasets/{dataset['id']}/entries", json={"entries": entries})
            assert created.json()["entries_created"] == len(entries), created.text
    return dataset["id"]


async def read_topic(
    running: RunningPlatform, topic: str, match: Any, *, timeout: float = 20.0
) -> list[dict[str, Any]]:
    """Every message on ``topic`` for which ``match(value)`` is true, waiting until at least one."""
    # Partitions assigned by hand: no consumer-group join to wait for.
    consumer = AIOKafkaConsumer(bootstrap_servers=running.settings.kafka_url, enable_auto_commit=False)
    await consumer.start()
    await consumer.topics()  # loads the metadata
    consumer.assign([TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()])
    await consumer.seek_to_beginning()
    found: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            for records in batches.values():
                for record in records:
                    try:
                        value = orjson.loads(record.value)
                    except orjson.JSONDecodeError:
                        continue  # other tests park poison messages on shared topics on purpose
                    if isinstance(value, dict) and match(value):
                        found.append(value)
            if found and not batches:
                return found
    finally:
        await consumer.stop()
    assert found, f"nothing matching on {topic} within {timeout}s"
    return found


async def make_run(
    running: RunningPlatform, project: Project, *, slug: str | None = None, base: str = TINY
) -> tuple[str, str]:
    """A Model and its job, written the way the api does but with no TrainingRequest sent (no trainer
    ever sees it), so a test drives it alone with events. Returns (slug, job id)."""
    slug = slug or f"run-{secrets.token_hex(4)}"
    sessions = running.platform.state["sessions"]
    async with sessions.begin() as session:
        plan = await service.plan_for_job(
            session=session,
            project_id=project.id,
            body=service.JobCreate(model=base, training_file="file-none"),
        )
        start = service.Start(
            project_id=project.id,
            slug=slug,
            dataset_id="file-none",
            plan=plan,
            training_file="file-none",
            snapshot_key="snapshots/none.jsonl",
        )
        _, job = await service.start_training(session=session, broker=None, start=start)
    return slug, job.id


class Events:
    """Publishes TrainingEvents for one job on the real broker, numbering them."""

    def __init__(self, running: RunningPlatform, project: Project, job_id: str) -> None:
        self.running, self.project, self.job_id, self.seq = running, project, job_id, 0

    async def send(self, type: str, *, seq: int | None = None, **fields: Any) -> TrainingEvent:
        if seq is None:
            self.seq += 1
            seq = self.seq
        event = TrainingEvent(
            event_id=f"{self.job_id}:{seq}",
            job_id=self.job_id,
            project_id=self.project.id,
            seq=seq,
            created_at=int(time.time()),
            type=type,  # type: ignore[arg-type]
            **fields,
        )
        await self.running.platform.broker.publish(
            event.model_dump(mode="json"), TRAINING_EVENTS_TOPIC, key=self.job_id.encode()
        )
        return event


async def wait_for_job(project: Project, job_id: str, check: Any, what: str, timeout: float = 20.0) -> dict:
    job: dict = {}

    async def reached() -> bool:
        nonlocal job
        async with project.client() as http:
            job = (await http.get(f"/fine_tuning/jobs/{job_id}")).json()
        return bool(check(job))

    await wait_until(reached, timeout=timeout, what=what)
    return job
