"""The /report producer (librdkafka): a returned send is acked by the broker, failures are errors."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import confluent_kafka
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.partitioner import DefaultPartitioner

from services.common.kafka import AckedProducer, TansuBroker, ensure_topics, free_port


async def _read_all(kafka_url: str, topic: str, expected: int, timeout: float = 20.0) -> list:
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka_url, enable_auto_commit=False)
    await consumer.start()
    try:
        await consumer.topics()
        consumer.assign([TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()])
        await consumer.seek_to_beginning()
        records: list = []
        deadline = time.monotonic() + timeout
        while len(records) < expected and time.monotonic() < deadline:
            for batch in (await consumer.getmany(timeout_ms=500)).values():
                records.extend(batch)
        return records
    finally:
        await consumer.stop()


async def test_every_acked_send_is_on_the_topic_under_the_key_partition_aiokafka_would_pick(
    tansu: TansuBroker,
) -> None:
    topic = f"acked-{uuid.uuid4().hex[:8]}"
    await ensure_topics(tansu.url, [topic])
    producer = AckedProducer(tansu.url, timeout=10)
    await producer.start()
    try:
        sends = [
            producer.send_and_wait(topic, f"m{i}".encode(), key=f"project-{i % 5}".encode())
            for i in range(300)
        ]
        await asyncio.gather(*sends)
    finally:
        await producer.stop()
    records = await _read_all(tansu.url, topic, 300)
    assert sorted(r.value for r in records) == sorted(f"m{i}".encode() for i in range(300))
    # Internal services publish logs with aiokafka (or Java's client): one project's logs must land
    # on one partition whoever produced them.
    partitions = sorted({r.partition for r in records})
    pick = DefaultPartitioner()
    for record in records:
        assert record.partition == pick(record.key, partitions, partitions)


async def test_a_send_to_a_broker_that_is_down_fails_within_the_timeout() -> None:
    producer = AckedProducer(f"127.0.0.1:{free_port()}", timeout=1.0)
    await producer.start()
    started = time.monotonic()
    try:
        with pytest.raises(confluent_kafka.KafkaException):
            await producer.send_and_wait("logs.v1", b"{}", key=b"p")
    finally:
        await producer.stop(timeout=1.0)
    assert time.monotonic() - started < 5


async def test_a_send_when_the_local_queue_is_full_fails_at_once() -> None:
    """librdkafka queues up to 100,000 messages while the broker is away; the next send must fail
    at once (``/report`` answers 503) rather than wait or grow the queue without bound."""
    producer = AckedProducer(f"127.0.0.1:{free_port()}", timeout=2.0)
    await producer.start()
    queued = [asyncio.create_task(producer.send_and_wait("logs.v1", b"{}", key=b"p")) for _ in range(100_000)]
    try:
        await asyncio.sleep(0)  # every task has handed its message to librdkafka
        assert not any(task.done() for task in queued)
        started = time.monotonic()
        with pytest.raises(confluent_kafka.KafkaException) as refused:
            await producer.send_and_wait("logs.v1", b"{}", key=b"p")
        assert refused.value.args[0].code() == confluent_kafka.KafkaError._QUEUE_FULL
        assert time.monotonic() - started < 2.0  # refused, not timed out after the 2 s publish timeout
    finally:
        for task in queued:
            task.cancel()
        await producer.stop(timeout=3.0)


async def test_stop_waits_for_the_acks_of_sends_in_flight(tansu: TansuBroker) -> None:
    topic = f"acked-{uuid.uuid4().hex[:8]}"
    await ensure_topics(tansu.url, [topic])
    producer = AckedProducer(tansu.url, timeout=10, linger_ms=200)
    await producer.start()
    sends = [asyncio.ensure_future(producer.send_and_wait(topic, b"x", key=b"k")) for _ in range(50)]
    await asyncio.sleep(0)  # all queued, none acked yet (lingering)
    await producer.stop()
    # Acked during stop(): each send returns without error (none is left hanging).
    await asyncio.wait_for(asyncio.gather(*sends), timeout=1)
    assert len(await _read_all(tansu.url, topic, 50)) == 50


async def test_stop_closes_the_connections_so_the_broker_can_exit_at_once(tmp_path: Path) -> None:
    """Tansu waits for open connections before it exits on SIGTERM (the platform kills it 5 s
    later): a stopped producer must not hold one."""
    broker = TansuBroker(free_port(), log_path=tmp_path / "tansu.log")
    broker.start()
    try:
        await ensure_topics(broker.url, ["closing"])
        producer = AckedProducer(broker.url, timeout=10)
        await producer.start()
        await producer.send_and_wait("closing", b"x", key=b"k")
        await producer.stop()
    finally:
        started = time.monotonic()
        await asyncio.to_thread(broker.stop)
    assert time.monotonic() - started < 3


async def test_sends_without_waiting_are_on_the_topic_once_stop_returns(tansu: TansuBroker) -> None:
    topic = f"nowait-{uuid.uuid4().hex[:8]}"
    await ensure_topics(tansu.url, [topic])
    producer = AckedProducer(tansu.url, timeout=10, linger_ms=200)
    await producer.start()
    failures: list = []
    for i in range(120):
        producer.send_nowait(topic, f"m{i}".encode(), key=b"k", on_failed=failures.append)
    await producer.stop()  # flushes what is lingering
    records = await _read_all(tansu.url, topic, 120)
    assert sorted(r.value for r in records) == sorted(f"m{i}".encode() for i in range(120))
    assert failures == []


async def test_a_send_without_waiting_reports_its_failure_when_the_broker_is_down() -> None:
    producer = AckedProducer(f"127.0.0.1:{free_port()}", timeout=1.0)
    await producer.start()
    failed = asyncio.get_running_loop().create_future()

    def on_failed(error: object) -> None:  # on the polling thread
        failed.get_loop().call_soon_threadsafe(failed.set_result, error)

    try:
        producer.send_nowait("logs.v1", b"{}", key=b"p", on_failed=on_failed)
        error = await asyncio.wait_for(failed, timeout=5)
        assert error.code() == confluent_kafka.KafkaError._MSG_TIMED_OUT
    finally:
        await producer.stop(timeout=1.0)


async def test_a_send_without_waiting_when_the_local_queue_is_full_fails_at_once() -> None:
    producer = AckedProducer(f"127.0.0.1:{free_port()}", timeout=2.0)
    await producer.start()
    failures: list = []
    try:
        for _ in range(100_000):  # librdkafka's queue while the broker is away
            producer.send_nowait("judgements.v1", b"{}", key=b"p", on_failed=failures.append)
        with pytest.raises(confluent_kafka.KafkaException) as refused:
            producer.send_nowait("judgements.v1", b"{}", key=b"p", on_failed=failures.append)
        assert refused.value.args[0].code() == confluent_kafka.KafkaError._QUEUE_FULL
    finally:
        await producer.stop(timeout=3.0)
