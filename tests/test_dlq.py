"""Every consumer has a dead-letter path: a poison message goes to ``<topic>.dlq`` with the reason,
and the consumer moves on to the next message."""

from __future__ import annotations

import asyncio
import secrets

import orjson
from pydantic import BaseModel

from services.common.dlq import PoisonMessage, subscribe_with_dlq
from services.common.events import (
    RELABEL_REQUESTS_TOPIC,
    RELABEL_RESULTS_TOPIC,
    DeadLetter,
    dlq_topic,
)
from services.common.kafka import ensure_topics, make_broker
from tests.conftest import wait_until
from tests.helpers import read_topic, send_raw


async def dead_letters(kafka_url: str, topic: str, marker: str) -> list[DeadLetter]:
    values = await read_topic(kafka_url, dlq_topic(topic))
    return [DeadLetter.model_validate_json(v) for v in values if marker.encode() in v]


async def wait_for_letters(kafka_url: str, topic: str, marker: str, n: int) -> list[DeadLetter]:
    found: list[DeadLetter] = []

    async def enough() -> bool:
        nonlocal found
        found = await dead_letters(kafka_url, topic, marker)
        return len(found) >= n

    await wait_until(enough, timeout=30, what=f"{n} dead letters on {dlq_topic(topic)}")
    return found


async def test_relabel_worker_dead_letters_malformed_requests_and_moves_on(running) -> None:
    kafka_url, marker = running.settings.kafka_url, secrets.token_hex(6)
    await running.platform.wait_consumers()
    not_json = f"not json {marker}".encode()
    wrong_shape = orjson.dumps({"request_id": marker, "job_id": 7, "items": "none"})
    await send_raw(kafka_url, RELABEL_REQUESTS_TOPIC, [not_json, wrong_shape], key=marker.encode())

    letters = await wait_for_letters(kafka_url, RELABEL_REQUESTS_TOPIC, marker, 2)
    by_payload = {letter.payload: letter for letter in letters}
    assert "invalid RelabelRequest" in by_payload[not_json.decode()].reason
    shape_reason = by_payload[wrong_shape.decode()].reason
    assert "invalid RelabelRequest" in shape_reason and "job_id" in shape_reason
    assert all(letter.topic == RELABEL_REQUESTS_TOPIC and letter.key == marker for letter in letters)


async def test_relabel_results_consumer_dead_letters_malformed_results_and_moves_on(running) -> None:
    kafka_url, marker = running.settings.kafka_url, secrets.token_hex(6)
    await running.platform.wait_consumers()
    missing_fields = orjson.dumps({"result_id": marker})
    bad_bytes = b"\xff\xfe" + marker.encode()
    await send_raw(kafka_url, RELABEL_RESULTS_TOPIC, [missing_fields, bad_bytes], key=marker.encode())

    letters = await wait_for_letters(kafka_url, RELABEL_RESULTS_TOPIC, marker, 2)
    reasons = sorted(letter.reason for letter in letters)
    assert all("invalid RelabelResult" in reason for reason in reasons)
    assert any("job_id" in reason for reason in reasons)


class Ping(BaseModel):
    id: str
    n: int


async def test_subscribe_with_dlq_retries_transient_failures_and_parks_poison(running) -> None:
    """The shared helper: valid events are handled; a transient failure is retried until it passes;
    a PoisonMessage or an error outlasting the retries is dead-lettered; order is kept."""
    kafka_url, settings = running.settings.kafka_url, running.settings
    topic = f"dlq.helper.{secrets.token_hex(4)}"
    await ensure_topics(kafka_url, [topic, dlq_topic(topic)], partitions=1)
    handled: list[str] = []
    attempts: dict[str, int] = {}

    broker = make_broker(kafka_url)

    @subscribe_with_dlq(broker, topic, Ping, group_id=f"g-{topic}", settings=settings, retry_seconds=1.0)
    async def handle(event: Ping) -> None:
        attempts[event.id] = attempts.get(event.id, 0) + 1
        if event.id == "poison":
            raise PoisonMessage(f"ping {event.n} cannot be processed")
        if event.id == "flaky" and attempts[event.id] < 3:
            raise ConnectionError("store briefly down")
        if event.id == "broken":
            raise RuntimeError("always fails")
        handled.append(event.id)

    messages = [
        orjson.dumps({"id": "first", "n": 1}),
        b"{not json",
        orjson.dumps({"id": "poison", "n": 2}),
        orjson.dumps({"id": "flaky", "n": 3}),
        orjson.dumps({"id": "broken", "n": 4}),
        orjson.dumps({"id": "last", "n": "five"}),  # wrong type
        orjson.dumps({"id": "last", "n": 5}),
    ]
    await send_raw(kafka_url, topic, messages, key=b"k")
    await broker.start()
    try:
        await wait_until(lambda: asyncio.sleep(0, "last" in handled), timeout=30, what="the last event")
        letters = await wait_for_letters(kafka_url, topic, "", 4)
    finally:
        await broker.stop()
    assert handled == ["first", "flaky", "last"]
    assert attempts["flaky"] == 3 and attempts["broken"] > 1
    assert [letter.offset for letter in letters] == [1, 2, 4, 5]
    reasons = [letter.reason for letter in letters]
    assert reasons[0].startswith("invalid Ping")
    assert reasons[1] == "Ping rejected: ping 2 cannot be processed"
    assert "RuntimeError: always fails" in reasons[2] and "retries" in reasons[2]
    assert "invalid Ping: n:" in reasons[3]
    assert letters[0].payload == "{not json" and letters[0].key == "k"
