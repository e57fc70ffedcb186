"""Helpers shared by test modules: request bodies, SDK clients, waits, topic readers, error checks.

Plain functions and constants only; fixtures live in tests/conftest.py.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import httpx
import openai
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from services.common.grpc.distillery.v1 import inference_pb2_grpc

if TYPE_CHECKING:
    from tests.conftest import Project

ROOT = Path(__file__).resolve().parent.parent
CHART_DIR = ROOT / "helm" / "distillery"
KUBERNETES_VERSION = "1.37.0"

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Count to 3"}]


# --- the API's error envelope ----------------------------------------------------------------------


def assert_error(response: httpx.Response, status: int, *fragments: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["message"] == body["error"]["message"]
    assert {"message", "type", "param", "code"} <= set(body["error"])
    for fragment in fragments:
        assert fragment in body["message"], body["message"]
    return body


# --- the router through the openai SDK -------------------------------------------------------------


def sdk(project: Project, **kwargs) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key=project.key, base_url=project.base_url, max_retries=0, **kwargs)


async def wait_for_router(project: Project, model: str = "gpt-4o-mini") -> None:
    """Provider settings travel over catalog.v1; wait until the router can serve ``model``."""
    client = sdk(project)
    for _ in range(100):
        try:
            await client.chat.completions.create(model=model, messages=MESSAGES)
            return
        except (openai.BadRequestError, openai.NotFoundError) as exc:
            assert exc.body["code"] in ("provider_key_missing", "model_not_found"), exc.body
            await asyncio.sleep(0.1)
    raise AssertionError("router never learned the project's provider keys")


# --- the router over gRPC --------------------------------------------------------------------------

Stub = inference_pb2_grpc.InferenceStub


def auth(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def trailing(error: grpc.aio.AioRpcError) -> dict[str, str]:
    return {key: value for key, value in error.trailing_metadata() or ()}


# --- ingest: report bodies -------------------------------------------------------------------------


def openai_body(
    *,
    content: str = "Count to 3",
    answer: str = "1, 2, 3",
    model: str = "gpt-4o-mini",
    completion_id: str = "chatcmpl-abc",
    metadata: dict | None = None,
    status: int = 200,
    requested_at: int | None = None,
) -> dict:
    now = requested_at or int(time.time() * 1000)
    request = {"model": model, "messages": [{"role": "user", "content": content}]}
    if metadata is not None:
        request["metadata"] = metadata
    response = {
        "id": completion_id,
        "object": "chat.completion",
        "created": now // 1000,
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17},
    }
    return {
        "requestedAt": now,
        "receivedAt": now + 420,
        "reqPayload": request,
        "respPayload": response,
        "statusCode": status,
    }


async def report_all(client, bodies: list[dict], route: str = "/report") -> None:
    for body in bodies:
        response = await client.post(route, json=body)
        assert response.status_code == 200, response.text
        assert response.json() == {"status": "ok"}


# --- Kafka topics, read and written without the platform -------------------------------------------


async def send_raw(kafka_url: str, topic: str, values: list[bytes], key: bytes) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=kafka_url, enable_idempotence=False)
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(topic, value, key=key)
    finally:
        await producer.stop()


async def read_topic(kafka_url: str, topic: str) -> list[bytes]:
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka_url, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or []]
        if not partitions:
            await consumer.topics()
            partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or []]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        values: list[bytes] = []
        while [tp for tp in partitions if await consumer.position(tp) < ends[tp]]:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                values += [r.value for r in records]
        return values
    finally:
        await consumer.stop()


async def committed_total(kafka_url: str, group: str, topic: str) -> int:
    """Sum of the group's committed offsets on ``topic`` (read without joining the group)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka_url, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        await consumer.topics()
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or []]
        return sum([max(await consumer.committed(tp) or 0, 0) for tp in partitions])
    finally:
        await consumer.stop()


# --- datasets and their jobs -----------------------------------------------------------------------

FINISHED = ("succeeded", "partial", "failed")


async def new_dataset(client: httpx.AsyncClient, name: str = "files") -> str:
    response = await client.post("/datasets", json={"name": name})
    assert response.status_code == 200, response.text
    return response.json()["id"]


async def wait_for_job(client: httpx.AsyncClient, dataset_id: str, job_id: str, timeout: float = 60) -> dict:
    from tests.conftest import wait_until  # conftest imports this module for its fixtures

    last: dict = {}

    async def finished() -> bool:
        nonlocal last
        response = await client.get(f"/datasets/{dataset_id}/jobs/{job_id}")
        assert response.status_code == 200, response.text
        last = response.json()
        return last["status"] in FINISHED

    await wait_until(finished, timeout=timeout, what=f"job {job_id}")
    return last


async def export_and_wait(client: httpx.AsyncClient, dataset_id: str) -> dict:
    """``POST /export`` is a job: wait for it and return its result, the ``dataset.export``."""
    response = await client.post(f"/datasets/{dataset_id}/export")
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["kind"] == "export" and response.headers["location"].endswith(f"/jobs/{job['id']}")
    done = await wait_for_job(client, dataset_id, job["id"])
    assert done["status"] == "succeeded", done
    assert done["progress"]["done"] == done["progress"]["total"] == done["result"]["entry_count"]
    return done["result"]
