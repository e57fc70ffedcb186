"""Logging proxied calls to ``logs.v1`` off the response path.

Events queue in memory and a background task publishes them (many in flight, each awaiting
Kafka's ack, through librdkafka like ``/report``: aiokafka's pure-Python producer under FastStream
cost the event loop about twice the CPU per message); a failed publish is retried, so a broker
hiccup delays logs but does not lose them while the process lives. On shutdown the queue is flushed.
"""

from __future__ import annotations

import asyncio
import logging

from services.common import tracing
from services.common.events import LOGS_TOPIC, LogEvent, flat_event_json
from services.common.kafka import AckedProducer

log = logging.getLogger(__name__)

Headers = list[tuple[str, bytes]] | None


class LogShipper:
    def __init__(
        self, producer: AckedProducer, *, max_in_flight: int = 256, max_queued: int = 200_000
    ) -> None:
        self.producer = producer
        self.max_in_flight = max_in_flight
        self._queue: asyncio.Queue[tuple[LogEvent, Headers]] = asyncio.Queue(maxsize=max_queued)
        self._task: asyncio.Task | None = None
        self.dropped = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="router-log-shipper")

    def ship(self, event: LogEvent) -> None:
        try:
            self._queue.put_nowait((event, tracing.kafka_headers()))
        except asyncio.QueueFull:
            self.dropped += 1
            log.error("log queue full (%d events): dropped log %s", self._queue.maxsize, event.log_id)

    async def _run(self) -> None:
        slots = asyncio.Semaphore(self.max_in_flight)
        in_flight: set[asyncio.Task] = set()

        def done(task: asyncio.Task) -> None:
            in_flight.discard(task)
            slots.release()

        while True:
            event, headers = await self._queue.get()
            await slots.acquire()
            task = asyncio.create_task(self._publish(event, headers))
            in_flight.add(task)
            task.add_done_callback(done)

    async def _publish(self, event: LogEvent, headers: Headers) -> None:
        payload, key = flat_event_json(event), event.project_id.encode()
        delay = 0.2
        while True:
            try:
                await self.producer.send_and_wait(LOGS_TOPIC, payload, key=key, headers=headers)
                self._queue.task_done()
                return
            except Exception as exc:
                log.warning("publishing log %s failed (%s); retrying in %.1fs", event.log_id, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def flush(self, timeout: float = 10.0) -> None:
        try:
            async with asyncio.timeout(timeout):
                await self._queue.join()
        except TimeoutError:
            log.error("%d logs still queued at shutdown", self._queue.qsize())

    async def stop(self) -> None:
        await self.flush()
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
