"""Components going down mid-run: the client always gets a clear error, nothing is half-written."""

from __future__ import annotations

from pathlib import Path

import httpx

from services.common.kafka import TansuBroker, free_port
from services.platform import Platform
from tests.conftest import BOOTSTRAP_KEY, platform_settings
from tests.helpers import openai_body


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
