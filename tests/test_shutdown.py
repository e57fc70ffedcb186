"""Clean shutdown and process lifetime: 503 + Retry-After once stopping, consumers finish the batch
in hand before they stop, children never outlive the platform, two installs never collide."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import httpx
import orjson
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient
from pydantic import BaseModel

from services.common.children import port_open
from services.common.dlq import subscribe_with_dlq
from services.common.embedded import Embedded
from services.common.events import dlq_topic
from services.common.kafka import ensure_topics, make_broker
from services.common.settings import Settings
from services.platform import FastRoutes
from tests.conftest import BOOTSTRAP_KEY, wait_until
from tests.helpers import committed_total, openai_body, read_topic, send_raw
from tests.helpers_crash import wait_dead


async def test_requests_arriving_while_stopping_get_503_with_retry_after(running) -> None:
    platform = running.platform
    stopping = FastRoutes(platform.app, platform.fast_routes, SimpleNamespace(stopping=True))
    transport = httpx.ASGITransport(app=stopping)
    headers = {"Authorization": f"Bearer {BOOTSTRAP_KEY}"}
    async with httpx.AsyncClient(transport=transport, base_url="http://t", headers=headers) as client:
        for method, path in (("POST", "/api/v1/report"), ("GET", "/api/v1/logs"), ("GET", "/healthz")):
            response = await client.request(method, path, json=openai_body() if method == "POST" else None)
            assert response.status_code == 503, (path, response.text)
            assert response.headers["retry-after"] == "2"
            assert response.headers["connection"] == "close"
            body = response.json()
            assert body["error"]["code"] == "shutting_down" and "shutting down" in body["message"]
    assert not platform.stopping  # the running platform itself still serves


class Slow(BaseModel):
    id: str


async def test_stop_lets_a_consumer_finish_and_commit_the_batch_in_hand(running) -> None:
    kafka_url, settings = running.settings.kafka_url, running.settings
    topic = f"shutdown.{secrets.token_hex(4)}"
    group = f"g-{topic}"
    await ensure_topics(kafka_url, [topic, dlq_topic(topic)], partitions=1)
    started, done = asyncio.Event(), []

    broker = make_broker(kafka_url, graceful_timeout=10)

    @subscribe_with_dlq(broker, topic, Slow, group_id=group, settings=settings)
    async def handle(event: Slow) -> None:
        started.set()
        await asyncio.sleep(1.0)  # the effect takes a while
        done.append(event.id)

    await send_raw(kafka_url, topic, [orjson.dumps({"id": "in-hand"})], key=b"k")
    await broker.start()
    try:
        await asyncio.wait_for(started.wait(), 30)
    finally:
        await broker.stop()  # while the handler sleeps
    assert done == ["in-hand"]
    assert await committed_total(kafka_url, group, topic) == 1


def test_two_installs_get_their_own_ports_and_reuse_them_on_restart(tmp_path: Path) -> None:
    stacks = [Embedded(Settings(data_dir=tmp_path / name)) for name in ("a", "b")]
    for stack in stacks:
        stack.settings.data_dir.mkdir()
        stack.begin()
    try:
        for stack in stacks:
            stack.wait()
        a, b = stacks
        assert a.settings.kafka_url != b.settings.kafka_url and a.s3.port != b.s3.port
        assert all(port_open(s.tansu.port) and port_open(s.s3.port) for s in stacks)
        recorded = json.loads((tmp_path / "a" / "ports.json").read_text())["kafka"]
        assert recorded == a.tansu.port
    finally:
        for stack in stacks:
            stack.stop()
    assert not port_open(recorded)
    again = Embedded(Settings(data_dir=tmp_path / "a"))
    again.begin()
    try:
        again.wait()
        assert again.tansu.port == recorded  # clients of the last run find the broker again
    finally:
        again.stop()
    with socket.socket() as taken:  # someone else took that port meanwhile: any free one will do
        taken.bind(("127.0.0.1", recorded))
        taken.listen()
        third = Embedded(Settings(data_dir=tmp_path / "a"))
        third.begin()
        try:
            third.wait()
            assert third.tansu.port != recorded and port_open(third.tansu.port)
        finally:
            third.stop()


def test_children_die_when_the_platform_process_is_killed(tmp_path: Path) -> None:
    """kill -9 of the parent: the kernel kills the broker and S3 children too (PR_SET_PDEATHSIG)."""
    script = textwrap.dedent(
        f"""
        import json, time
        from pathlib import Path
        from services.common.embedded import Embedded
        from services.common.settings import Settings
        stack = Embedded(Settings(data_dir=Path({str(tmp_path)!r})))
        stack.begin(); stack.wait()
        print(json.dumps([stack.tansu.pid, stack.s3.pid]), flush=True)
        time.sleep(600)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        children = json.loads(parent.stdout.readline())
        assert all(Path(f"/proc/{pid}").exists() for pid in children)
    finally:
        parent.kill()
        parent.wait()
    assert not wait_dead(children), "a child outlived its killed parent"


async def test_s3_killed_is_restarted_on_its_ports_and_the_broker_keeps_storing(tmp_path: Path) -> None:
    stack = Embedded(Settings(data_dir=tmp_path))
    stack.begin()
    stack.wait()
    try:
        await ensure_topics(stack.settings.kafka_url, ["after-s3-restart"], partitions=1)
        old_pid, ports = stack.s3.pid, dict(stack.s3.ports)
        os.kill(old_pid, signal.SIGKILL)
        await wait_until(lambda: stack.s3.pid != old_pid and port_open(stack.s3.port), what="S3 back")
        assert stack.s3.ports == ports
        await send_raw(stack.settings.kafka_url, "after-s3-restart", [b"stored"], key=b"k")
        assert await read_topic(stack.settings.kafka_url, "after-s3-restart") == [b"stored"]
    finally:
        stack.stop()


async def test_a_consumer_stopped_in_its_groups_first_generation_leaves_the_group(tansu) -> None:
    """Tansu numbers a group's first generation 0 (Kafka: 1). A consumer stopped then must still
    leave, or a restart within the session timeout waits for the dead member (18 s, not 5 s)."""
    topic, group = f"leave-{secrets.token_hex(4)}", f"leavers-{secrets.token_hex(4)}"
    await ensure_topics(tansu.url, [topic])
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=tansu.url, group_id=group)
    await consumer.start()
    try:
        await wait_until(lambda: bool(consumer.assignment()), what="partitions assigned", timeout=30)
        assert consumer._coordinator.generation == 0  # the case aiokafka does not leave from
    finally:
        await consumer.stop()
    admin = AIOKafkaAdminClient(bootstrap_servers=tansu.url)
    await admin.start()
    try:
        (described,) = await admin.describe_consumer_groups([group])
    finally:
        await admin.close()
    (group_info,) = described.groups
    assert group_info[1] == group and group_info[5] == []  # no members left
