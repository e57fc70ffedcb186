"""Components going down mid-run: the client always gets a clear error, nothing is half-written."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import orjson

from services.common.events import LOGS_TOPIC, LogEvent
from services.common.kafka import AckedProducer, TansuBroker, ensure_topics, free_port
from services.common.log_fields import new_log_id
from services.platform import Platform
from services.router.log_shipper import LogShipper
from tests.conftest import BOOTSTRAP_KEY, platform_settings
from tests.helpers import openai_body, read_topic


async def test_broker_down_mid_run_gives_503_and_reads_keep_working(tmp_path: Path, chdb_url: str) -> None:
    tansu = TansuBroker(free_port(), log_path=tmp_path / "tansu.log")
    tansu.start()
    platform = Platform(platform_settings(tmp_path, tansu.url, chdb_url, publish_timeout_seconds=2.0))
    await platform.start()
    transport = httpx.ASGITransport(app=platform.app)
    headers = {"Authorization": f"Bearer {BOOTSTRAP_KEY}"}
    try:
        async with httpx.AsyncClient(
            transport=transport, base_url="http://t/api/v1", headers=headers
        ) as client:
            assert (await client.post("/report", json=openai_body())).status_code == 200
            tansu.stop()
            response = await client.post("/report", json=openai_body(completion_id="never"))
            assert response.status_code == 503
            assert "event broker is unavailable" in response.json()["message"]
            assert response.json()["error"]["code"] == "service_unavailable"
            # ClickHouse is still up: searches answer, and the refused call is nowhere
            found = await client.get("/logs", params={"completionId": "never"})
            assert found.status_code == 200 and found.json()["data"] == []
    finally:
        await platform.stop()
        tansu.stop()


async def test_clickhouse_unreachable_gives_503(tmp_path: Path, tansu: TansuBroker, chdb_url: str) -> None:
    from services.common.clickhouse import ClickHouse
    from services.ingest.service import IngestDeps

    platform = Platform(platform_settings(tmp_path, tansu.url, chdb_url))
    await platform.start()
    # point the routes at a ClickHouse server that is not there
    dead = ClickHouse(f"http://default:pw@127.0.0.1:{free_port()}/distillery")
    platform.app.state.ingest = IngestDeps(producer=platform.state["ingest"].producer, clickhouse=dead)
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=platform.app),
            base_url="http://t/api/v1",
            headers={"Authorization": f"Bearer {BOOTSTRAP_KEY}"},
        ) as client:
            for response in (
                await client.get("/logs"),
                await client.get("/logs/count"),
                await client.get("/logs/export"),
                await client.post(
                    "/logs/update-metadata",
                    json={"filters": [{"field": "model", "equals": "m"}], "metadata": {"a": "b"}},
                ),
            ):
                assert response.status_code == 503, response.text
                assert "log store is unavailable" in response.json()["message"]
                assert "pw" not in response.text
    finally:
        await platform.stop()


async def test_platform_uses_the_s3_blob_store_when_configured(
    tmp_path: Path, tansu: TansuBroker, chdb_url: str, s3_url: str
) -> None:
    """The MinIO code path: a platform configured with s3:// creates its bucket on a real S3 endpoint."""
    platform = Platform(platform_settings(tmp_path, tansu.url, chdb_url, blob_url=s3_url + "-platform"))
    await platform.start()
    try:
        uri = await platform.blobs.put_bytes("probe/hello.txt", b"hi")
        assert uri.startswith("s3://") and await platform.blobs.get_bytes("probe/hello.txt") == b"hi"
    finally:
        await platform.stop()


async def test_router_logs_wait_out_a_broker_outage(tmp_path: Path) -> None:
    """A proxied call's log is published off the response path: while the broker is down the
    shipper keeps retrying, and the log arrives once a broker answers on that address."""
    port = free_port()
    producer = AckedProducer(f"127.0.0.1:{port}", timeout=1.0)
    await producer.start()
    shipper = LogShipper(producer)
    shipper.start()
    event = LogEvent(
        log_id=new_log_id(), project_id="proj_outage", requested_at=1, received_at=2, req_payload={"a": 1}
    )
    tansu = TansuBroker(port, log_path=tmp_path / "tansu.log")
    try:
        shipper.ship(event)
        await asyncio.sleep(1.5)  # the first attempt has failed: nothing listened
        tansu.start()
        await ensure_topics(tansu.url)
        await shipper.flush(timeout=30)
        values = await read_topic(tansu.url, LOGS_TOPIC)
        assert [orjson.loads(v)["log_id"] for v in values] == [event.log_id]
        assert LogEvent.model_validate_json(values[0]) == event
    finally:
        await shipper.stop()
        await producer.stop()
        tansu.stop()
