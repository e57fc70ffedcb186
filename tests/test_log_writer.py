"""The Kafka → ClickHouse writer: direct publishers, poison messages, idempotency, outages, crashes."""

from __future__ import annotations

import asyncio
import secrets

import orjson
from aiokafka import AIOKafkaProducer

from examples.publish_logs import log_event, publish
from services.common.clickhouse import ClickHouse
from services.common.events import LOGS_TOPIC, DeadLetter, dlq_topic
from services.common.kafka import ensure_topics, make_broker
from services.ingest import store
from services.ingest.consumers import WRITER_GROUP, register_log_writer
from tests.conftest import Project, wait_for_count, wait_until
from tests.helpers import committed_total, read_topic, send_raw

REQUEST = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}
RESPONSE = {
    "id": "chatcmpl-direct",
    "object": "chat.completion",
    "model": "gpt-4o-mini",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
}


def events_for(project_id: str, n: int, **metadata: str) -> list[dict]:
    return [
        log_event(project_id, REQUEST, RESPONSE, latency_ms=200, metadata={"i": str(i), **metadata})
        for i in range(n)
    ]


async def test_direct_kafka_publish_is_queryable(project: Project, running) -> None:
    await publish(running.settings.kafka_url, events_for(project.id, 25, source="direct"))
    async with project.client() as client:
        assert await wait_for_count(client, 25, params={"metadata.source": "direct"}) == 25
        log = (await client.get("/logs", params={"limit": 1})).json()["data"][0]
    assert log["model"] == "gpt-4o-mini" and log["latencyMs"] == 200 and log["usage"]["total_tokens"] == 6


async def test_redelivered_events_are_stored_once(project: Project, running) -> None:
    events = events_for(project.id, 10)
    for _ in range(3):
        await publish(running.settings.kafka_url, events)
    async with project.client() as client:
        await wait_for_count(client, 10)
        await asyncio.sleep(1.0)  # give any duplicate time to land
        assert (await client.get("/logs/count")).json()["count"] == 10


async def test_poison_messages_go_to_the_dlq_and_do_not_block(project: Project, running) -> None:
    marker = secrets.token_hex(8)
    good = [orjson.dumps(e) for e in events_for(project.id, 3, marker=marker)]
    missing_field = orjson.loads(good[0])
    del missing_field["requested_at"]
    missing_field["log_id"] = f"bad-{marker}-1"
    wrong_type = {**orjson.loads(good[1]), "log_id": f"bad-{marker}-2", "received_at": "noon"}
    unknown_field = {**orjson.loads(good[2]), "log_id": f"bad-{marker}-3", "colour": "red"}
    poison = [
        b"not json " + marker.encode(),
        orjson.dumps(missing_field),
        orjson.dumps(wrong_type),
        orjson.dumps(unknown_field),
    ]
    await send_raw(
        running.settings.kafka_url,
        LOGS_TOPIC,
        [poison[0], good[0], poison[1], poison[2], good[1], poison[3], good[2]],
        key=project.id.encode(),
    )
    async with project.client() as client:
        assert await wait_for_count(client, 3) == 3

    async def parked() -> list[DeadLetter]:
        letters = [
            DeadLetter.model_validate_json(v)
            for v in await read_topic(running.settings.kafka_url, dlq_topic(LOGS_TOPIC))
        ]
        return [d for d in letters if marker in d.payload]

    await wait_until(lambda: _has_n(parked, 4), what="4 dead letters")
    reasons = {d.offset: d.reason for d in await parked()}
    assert len(reasons) == 4
    joined = " | ".join(reasons.values())
    assert "requested_at" in joined and "received_at" in joined and "colour" in joined
    assert any("invalid log event" in r for r in reasons.values())


async def test_unknown_project_and_key_mismatch_are_dead_lettered(
    project: Project, make_project, running
) -> None:
    """A producer's typo must be visible: nothing is stored under a project no one can see."""
    other_project = await make_project()
    marker = secrets.token_hex(8)
    good, unknown, mismatched = events_for(project.id, 3, marker=marker)
    unknown["project_id"] = f"proj_typo_{marker}"
    await send_raw(running.settings.kafka_url, LOGS_TOPIC, [orjson.dumps(good)], key=project.id.encode())
    await send_raw(
        running.settings.kafka_url, LOGS_TOPIC, [orjson.dumps(unknown)], key=unknown["project_id"].encode()
    )
    await send_raw(
        running.settings.kafka_url, LOGS_TOPIC, [orjson.dumps(mismatched)], key=other_project.id.encode()
    )

    async def parked() -> list[DeadLetter]:
        letters = [
            DeadLetter.model_validate_json(v)
            for v in await read_topic(running.settings.kafka_url, dlq_topic(LOGS_TOPIC))
        ]
        return [d for d in letters if marker in d.payload]

    await wait_until(lambda: _has_n(parked, 2), what="2 dead letters")
    reasons = sorted(d.reason for d in await parked())
    assert reasons[0].startswith("key mismatch") and other_project.id in reasons[0]
    assert reasons[1].startswith("unknown project") and f"proj_typo_{marker}" in reasons[1]
    for owner in (project, other_project):
        async with owner.client() as client:
            count = await wait_for_count(
                client, 1 if owner is project else 0, params={"metadata.marker": marker}
            )
            assert count == (1 if owner is project else 0)


async def _has_n(fetch, n: int) -> bool:
    return len(await fetch()) >= n


async def test_clickhouse_outage_pauses_writes_and_loses_nothing(project: Project, running) -> None:
    ch: ClickHouse = running.platform.state["ingest"].clickhouse
    table, away = f"{ch.database}.{store.TABLE}", f"{ch.database}.{store.TABLE}_offline"
    kafka_url = running.settings.kafka_url
    committed_before = await committed_total(kafka_url, WRITER_GROUP, LOGS_TOPIC)
    await ch.command(f"RENAME TABLE {table} TO {away}")
    try:
        await publish(kafka_url, events_for(project.id, 40, phase="outage"))
        async with project.client() as client:
            # reads fail cleanly while the store is gone
            response = await client.get("/logs/count")
            assert response.status_code == 503
            assert "log store is unavailable" in response.json()["message"]
        # longer than the writer's retry window, so the batch is also handed back to Kafka
        await asyncio.sleep(running.settings.log_insert_retry_seconds + 2)
        assert await committed_total(kafka_url, WRITER_GROUP, LOGS_TOPIC) == committed_before
    finally:
        await ch.command(f"RENAME TABLE {away} TO {table}")
    async with project.client() as client:
        assert await wait_for_count(client, 40, timeout=40) == 40
        await asyncio.sleep(0.5)
        assert (await client.get("/logs/count")).json()["count"] == 40
    await wait_until(lambda: _committed_at_least(kafka_url, committed_before + 40), what="offsets committed")


async def _committed_at_least(kafka_url: str, n: int) -> bool:
    return await committed_total(kafka_url, WRITER_GROUP, LOGS_TOPIC) >= n


class Killed(BaseException):
    """Not an Exception: nothing acks, nacks or retries; the consuming task just dies."""


class DieAfterInsert(ClickHouse):
    """A real ClickHouse handle whose writer dies right after the insert, before the commit."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.inserted = asyncio.Event()

    async def insert(self, *args, **kwargs) -> None:  # type: ignore[override]
        await super().insert(*args, **kwargs)
        self.inserted.set()
        raise Killed


async def test_writer_killed_between_insert_and_commit(project: Project, running, chdb_url: str) -> None:
    kafka_url, settings = running.settings.kafka_url, running.settings
    topic, group = f"logs.crash.{secrets.token_hex(4)}", f"writer-crash-{secrets.token_hex(4)}"
    await ensure_topics(kafka_url, [topic, dlq_topic(topic)])
    producer = AIOKafkaProducer(bootstrap_servers=kafka_url, enable_idempotence=False)
    await producer.start()
    for event in events_for(project.id, 30):
        await producer.send_and_wait(topic, orjson.dumps(event), key=project.id.encode())

    dying_ch = DieAfterInsert(chdb_url)
    first = make_broker(kafka_url)
    register_log_writer(first, dying_ch, settings, topic=topic, group_id=group)
    await first.start()
    await asyncio.wait_for(dying_ch.inserted.wait(), 30)
    await asyncio.wait_for(first.stop(), 10)  # the process is gone; it committed nothing
    async with project.client() as client:
        landed = (await client.get("/logs/count")).json()["count"]
        assert 0 < landed <= 30  # the first batch's insert did land
    assert await committed_total(kafka_url, group, topic) == 0

    second = make_broker(kafka_url)
    register_log_writer(second, ClickHouse(chdb_url), settings, topic=topic, group_id=group)
    await second.start()
    try:
        async with project.client() as client:
            assert await wait_for_count(client, 30, timeout=40) == 30
            for event in events_for(project.id, 5):
                await producer.send_and_wait(topic, orjson.dumps(event), key=project.id.encode())
            assert await wait_for_count(client, 35, timeout=40) == 35
            await asyncio.sleep(0.5)
            assert (await client.get("/logs/count")).json()["count"] == 35  # no duplicates visible
        await wait_until(lambda: _group_committed(kafka_url, group, topic, 35), what="offsets committed")
    finally:
        await second.stop()
        await producer.stop()


async def _group_committed(kafka_url: str, group: str, topic: str, n: int) -> bool:
    return await committed_total(kafka_url, group, topic) >= n


def _row(event: dict) -> dict:
    from services.ingest.log_rows import decode_log_event, event_to_row

    return dict(zip(store.COLUMNS, event_to_row(decode_log_event(orjson.dumps(event)), 0), strict=True))


def test_event_rows_derive_status_and_cost() -> None:
    event = log_event("p", REQUEST, RESPONSE, latency_ms=100, metadata={})
    row = _row(event)
    assert row["status"] == "success" and row["completion_id"] == "chatcmpl-direct"
    assert row["cost_usd"] == (5 * 0.15 + 1 * 0.60) / 1e6
    failed_row = _row({**event, "status_code": 500, "resp_payload": {"error": {"message": "x"}}})
    assert failed_row["status"] == "error" and failed_row["cost_usd"] is None
    pending_row = _row({**event, "status_code": None, "resp_payload": None})
    assert pending_row["status"] == "pending" and pending_row["resp_payload"] == ""


async def test_a_batch_whose_dead_letters_cannot_be_parked_is_read_again(
    project: Project, running, chdb_url: str
) -> None:
    """The DLQ publish fails once: that batch is neither written nor skipped; later batches follow it."""
    kafka_url, settings = running.settings.kafka_url, running.settings
    topic, group = f"logs.dlqfail.{secrets.token_hex(4)}", f"writer-dlqfail-{secrets.token_hex(4)}"
    await ensure_topics(kafka_url, [topic, dlq_topic(topic)])
    marker = secrets.token_hex(6)
    first = [orjson.dumps(e) for e in events_for(project.id, 3, marker=marker)]
    await send_raw(kafka_url, topic, [b"not json " + marker.encode(), *first], key=project.id.encode())

    broker = make_broker(kafka_url)
    register_log_writer(broker, ClickHouse(chdb_url), settings, topic=topic, group_id=group)
    publish_letter, failures = broker.publish, []

    async def publish_failing_once(*args, **kwargs):  # the DLQ is the writer's only publish
        if not failures:
            failures.append(args)
            raise ConnectionError("DLQ unreachable")
        return await publish_letter(*args, **kwargs)

    broker.publish = publish_failing_once  # type: ignore[method-assign]
    await broker.start()
    try:
        await wait_until(lambda: _true(bool(failures)), what="the failed DLQ publish")
        later = [orjson.dumps(e) for e in events_for(project.id, 5, marker=marker)]
        await send_raw(kafka_url, topic, later, key=project.id.encode())
        async with project.client() as client:
            assert await wait_for_count(client, 8, params={"metadata.marker": marker}) == 8
        await wait_until(lambda: _group_committed(kafka_url, group, topic, 9), what="all 9 offsets committed")
        parked = [v for v in await read_topic(kafka_url, dlq_topic(topic)) if marker.encode() in v]
        assert len(parked) == 1
    finally:
        await broker.stop()


async def _true(value: bool) -> bool:
    return value


async def test_out_of_range_token_counts_do_not_block_the_batch(project: Project, running) -> None:
    """Token counts come from free-form responses: ones that do not fit UInt32 are stored clamped."""
    marker = secrets.token_hex(6)
    events = events_for(project.id, 4, marker=marker)
    for event, tokens in zip(events, (-5, 2**40), strict=False):
        event["resp_payload"] = {**RESPONSE, "usage": {"prompt_tokens": tokens, "completion_tokens": 1}}
    await publish(running.settings.kafka_url, events)
    async with project.client() as client:
        assert await wait_for_count(client, 4, params={"metadata.marker": marker}) == 4
        logs = (await client.get("/logs", params={"metadata.marker": marker})).json()["data"]
    assert sorted(log["usage"]["prompt_tokens"] for log in logs) == [0, 5, 5, 2**32 - 1]


class FailsOnce(ClickHouse):
    """A real ClickHouse handle whose first insert fails (slowly, so the next batch is in hand by
    then); records which events each later insert wrote, by their ``i`` metadata."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.failed = False
        self.written: list[list[int]] = []

    async def insert(self, table, rows, column_names, settings=None) -> None:  # type: ignore[override]
        if not self.failed:
            self.failed = True
            await asyncio.sleep(0.5)
            raise ConnectionError("ClickHouse is away")
        await super().insert(table, rows, column_names, settings)
        where = list(column_names).index("metadata")
        self.written.append(sorted(int(row[where]["i"]) for row in rows))


async def test_a_failed_insert_rewinds_and_the_batch_fetched_meanwhile_is_read_again(
    project: Project, running, chdb_url: str
) -> None:
    """The writer decodes batch N+1 while batch N is being inserted: when N's insert gives up, N+1
    (already in hand) must not be written or committed before N; both are read again in order."""
    kafka_url = running.settings.kafka_url
    settings = running.settings.model_copy(update={"log_batch_max_rows": 4, "log_insert_retry_seconds": 0.1})
    topic, group = f"logs.rewind.{secrets.token_hex(4)}", f"writer-rewind-{secrets.token_hex(4)}"
    await ensure_topics(kafka_url, [topic, dlq_topic(topic)])
    marker = secrets.token_hex(6)
    events = [orjson.dumps(e) for e in events_for(project.id, 12, marker=marker)]
    await send_raw(kafka_url, topic, events, key=project.id.encode())

    ch = FailsOnce(chdb_url)
    broker = make_broker(kafka_url)
    pipeline = register_log_writer(broker, ch, settings, topic=topic, group_id=group)
    await broker.start()
    try:
        async with project.client() as client:
            assert await wait_for_count(client, 12, params={"metadata.marker": marker}) == 12
        await wait_until(
            lambda: _group_committed(kafka_url, group, topic, 12), what="all 12 offsets committed"
        )
        await pipeline.close()
    finally:
        await broker.stop()
    assert ch.failed
    # The failed batch's events first, not the batch decoded meanwhile; then the rest in order, each
    # once. (How many records a fetch after the rewind brings back is the broker's choice.)
    assert ch.written[0][0] == 0
    assert [i for batch in ch.written for i in batch] == list(range(12))
