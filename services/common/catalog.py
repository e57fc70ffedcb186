"""Materialize the keyed ``catalog.v1`` topic into memory and keep it current.

Every reader replays the topic from the beginning (no consumer group: each process
needs the whole catalog), then follows new records. Nothing on the hot path waits
on Postgres.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer, TopicPartition
from pydantic import ValidationError

from services.common.events import CATALOG_TOPIC, CatalogRecord

log = logging.getLogger(__name__)

CatalogHandler = Callable[[CatalogRecord], None]


class CatalogReader:
    def __init__(self, kafka_url: str, handlers: list[CatalogHandler]) -> None:
        self.kafka_url = kafka_url
        self.handlers = handlers
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task | None = None
        self._caught_up = asyncio.Event()
        # Records this process published and applied at once (``apply``), by key, in publish order,
        # until the topic brings them back: an older one arriving then must not undo a newer one.
        self._ahead: dict[str, list[CatalogRecord]] = {}

    async def start(self) -> None:
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.kafka_url, enable_auto_commit=False, group_id=None
        )
        await self._consumer.start()
        partitions = await self._wait_for_partitions()
        # Before assigning: asked afterwards, aiokafka answered only once its first fetch (held by
        # the broker up to fetch_max_wait_ms, 500 ms on an empty topic) came back.
        end_offsets = await self._consumer.end_offsets(partitions)
        self._consumer.assign(partitions)
        await self._consumer.seek_to_beginning(*partitions)
        self._task = asyncio.create_task(self._follow(end_offsets), name="catalog-reader")

    async def _wait_for_partitions(self) -> list[TopicPartition]:
        assert self._consumer is not None
        for _ in range(100):
            ids = self._consumer.partitions_for_topic(CATALOG_TOPIC)
            if ids:
                return [TopicPartition(CATALOG_TOPIC, p) for p in sorted(ids)]
            await self._consumer.topics()  # refresh metadata
            await asyncio.sleep(0.1)
        raise RuntimeError(f"topic {CATALOG_TOPIC} does not exist; create topics first")

    async def _follow(self, end_offsets: dict[TopicPartition, int]) -> None:
        assert self._consumer is not None
        pending = {tp for tp, end in end_offsets.items() if end > 0}
        if not pending:
            self._caught_up.set()
        while True:
            batches = await self._consumer.getmany(timeout_ms=200)
            for tp, records in batches.items():
                for record in records:
                    self._apply(record.value)
                    if tp in pending and record.offset + 1 >= end_offsets[tp]:
                        pending.discard(tp)
            if pending and all(await self._consumer.position(tp) >= end_offsets[tp] for tp in list(pending)):
                pending.clear()
            if not pending:
                self._caught_up.set()

    def _apply(self, value: bytes | None) -> None:
        if value is None:
            return
        try:
            record = CatalogRecord.model_validate_json(value)
        except ValidationError as exc:
            log.error("skipping malformed catalog record: %s", exc.errors()[:1])
            return
        ahead = self._ahead.get(record.key)
        if ahead and record in ahead:
            del ahead[: ahead.index(record) + 1]
            if ahead:
                return  # a newer record of this key was already applied locally
            del self._ahead[record.key]
        for handler in self.handlers:
            handler(record)

    def apply(self, record: CatalogRecord) -> None:
        """Apply a record this process has just published, without waiting for the topic to bring it
        back: read your writes within one process (the topic's copy later is a no-op)."""
        self._ahead.setdefault(record.key, []).append(record)
        for handler in self.handlers:
            handler(record)

    async def wait_caught_up(self) -> None:
        """Returns once every record present at start-up has been applied."""
        await self._caught_up.wait()

    async def sync(self, timeout: float = 5.0) -> bool:
        """Wait until every record published before this call has been applied (read-your-writes
        across processes); False if that took longer than ``timeout`` seconds."""
        if self._consumer is None:
            return False
        partitions = list(self._consumer.assignment())
        try:
            async with asyncio.timeout(timeout):
                ends = await self._consumer.end_offsets(partitions)
                while await self._behind(ends):  # noqa: ASYNC110 (the follow task moves the positions)
                    await asyncio.sleep(0.02)
        except TimeoutError:
            return False
        return True

    async def _behind(self, ends: dict[TopicPartition, int]) -> bool:
        assert self._consumer is not None
        for tp, end in ends.items():
            if await self._consumer.position(tp) < end:
                return True
        return False

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._consumer:
            await self._consumer.stop()
