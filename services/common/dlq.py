"""Consume with a dead-letter path: a message that cannot be processed goes to ``<topic>.dlq``.

``subscribe_with_dlq`` registers a handler for one typed event on one topic::

    @subscribe_with_dlq(broker, TOPIC, MyEvent, group_id="my-group", settings=settings)
    async def handle(event: MyEvent) -> None: ...

- a message that is not valid JSON for the model goes to the DLQ with the field and the reason;
- a handler raising ``PoisonMessage(reason)`` sends the message to the DLQ (input it can never
  process: unknown ids, impossible values);
- any other exception is retried with backoff for ``retry_seconds``, then dead-lettered with
  the last error (``retry_seconds=None``: retried until it succeeds);
- the offset is committed only after the handler returned or the dead letter was published;
  if even the DLQ cannot be written the message is read again, never skipped.

Handlers must be idempotent: after a crash the last messages are delivered again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiokafka import ConsumerRecord
from faststream import AckPolicy
from faststream.kafka import KafkaBroker, KafkaMessage
from pydantic import BaseModel, ValidationError

from services.common.events import DeadLetter, dlq_topic
from services.common.settings import Settings

log = logging.getLogger(__name__)

E = TypeVar("E", bound=BaseModel)
Handler = Callable[[E], Awaitable[None]]


class PoisonMessage(Exception):
    """Raised by a handler for a message it can never process; the message goes to the DLQ."""


def dead_letter(record: ConsumerRecord, reason: str) -> DeadLetter:
    """The DLQ envelope for ``record``: where it was, why it failed, the payload as sent."""
    value = record.value or b""
    return DeadLetter(
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        reason=reason[:2000],
        key=record.key.decode(errors="replace") if record.key else None,
        payload=value.decode(errors="replace"),
        failed_at=int(time.time() * 1000),
    )


async def publish_dead_letter(broker: KafkaBroker, letter: DeadLetter) -> None:
    """Publish ``letter`` on ``<topic>.dlq``; raises if the broker does not take it."""
    await broker.publish(
        letter.model_dump(mode="json"), dlq_topic(letter.topic), key=letter.key and letter.key.encode()
    )
    log.error(
        "message at %s/%d@%d sent to %s: %s",
        letter.topic,
        letter.partition,
        letter.offset,
        dlq_topic(letter.topic),
        letter.reason,
    )


def validation_reason(model: type[BaseModel], exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ())) or "message"
    return f"invalid {model.__name__}: {where}: {first.get('msg')}"


async def raw_records(_msg: object) -> None:
    """A FastStream ``decoder`` that skips decoding: the handler parses the record(s) itself, so a
    poison message reaches the DLQ instead of failing the batch forever."""
    return None


def subscribe_with_dlq(
    broker: KafkaBroker,
    topic: str,
    model: type[E],
    *,
    group_id: str,
    settings: Settings,
    retry_seconds: float | None = 30.0,
    **subscriber_options: Any,
) -> Callable[[Handler[E]], Handler[E]]:
    """Register the decorated ``handler(event)`` on ``topic`` with a dead-letter path (see above).

    ``subscriber_options`` go to ``broker.subscriber`` (``max_poll_interval_ms``, ...)."""
    options: dict[str, Any] = {
        "auto_offset_reset": "earliest",
        "heartbeat_interval_ms": settings.kafka_heartbeat_ms,
        "session_timeout_ms": settings.kafka_session_timeout_ms,
        **subscriber_options,
    }

    def register(handler: Handler[E]) -> Handler[E]:
        async def consume(msg: KafkaMessage) -> None:
            record: ConsumerRecord = msg.raw_message  # type: ignore[assignment]
            reason = await _process(handler, model, record, retry_seconds)
            if reason is not None:
                await publish_dead_letter(broker, dead_letter(record, reason))

        consume.__name__ = consume.__qualname__ = f"{handler.__name__}_with_dlq"
        broker.subscriber(
            topic,
            group_id=group_id,
            ack_policy=AckPolicy.NACK_ON_ERROR,
            decoder=raw_records,
            **options,
        )(consume)
        return handler

    return register


async def _process(
    handler: Handler[E], model: type[E], record: ConsumerRecord, retry_seconds: float | None
) -> str | None:
    """Run the handler; the reason to dead-letter the record, or None once it is processed."""
    try:
        event = model.model_validate_json(record.value or b"")
    except ValidationError as exc:
        return validation_reason(model, exc)
    delay = 0.2
    deadline = None if retry_seconds is None else time.monotonic() + retry_seconds
    while True:
        try:
            await handler(event)
            return None
        except PoisonMessage as exc:
            return f"{model.__name__} rejected: {exc}"
        except Exception as exc:
            if deadline is not None and time.monotonic() + delay > deadline:
                return f"failed after {retry_seconds:.0f}s of retries: {type(exc).__name__}: {exc}"
            log.warning(
                "%s at %s/%d@%d failed (%s: %s); retrying in %.1fs",
                model.__name__,
                record.topic,
                record.partition,
                record.offset,
                type(exc).__name__,
                exc,
                delay,
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
