"""The production topology, here: each service its own process (``python -m services.<name>``), the
way docker-compose and the Helm chart run them, against the real local parts: a Tansu broker of
its own, chDB (opened by ingest alone), Postgres, SeaweedFS (S3) and Redis. The SDKs drive the
flow through one base URL: a small path-routing proxy that serves helm/distillery/files/routes.yaml,
the table the Ingress and the compose gateway serve.

This proves the services talk only over Kafka, gRPC and HTTP: the api imports logs from ingest
over gRPC, the relabel worker asks the router over gRPC, the router's logs reach ingest's writer
over Kafka, and every service learns the project's key from catalog.v1.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import asyncpg
import httpx
import openai
import pytest
import yaml
from aiohttp import web
from openpipe.client import AsyncOpenPipe

from services.common.kafka import TansuBroker, free_port
from tests.conftest import POSTGRES_ADMIN, wait_until
from tests.fake_upstream import OPENAI_KEY, FakeUpstream

ROOT = Path(__file__).resolve().parent.parent
ROUTES = yaml.safe_load((ROOT / "helm" / "distillery" / "files" / "routes.yaml").read_text())
SERVICES = ("api", "ingest", "router", "relabel")
BOOTSTRAP_KEY = "opk_topology_" + secrets.token_hex(8)
START_TIMEOUT_S = 60.0
TERMINAL = ("succeeded", "partial", "failed")
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "upgrade"}


def owner(path: str) -> str | None:
    """The service owning ``path``: longest prefix by whole segments, as an Ingress Prefix path."""
    matches = [r for r in ROUTES if path == r["prefix"] or path.startswith(r["prefix"] + "/")]
    return max(matches, key=lambda r: len(r["prefix"]))["service"] if matches else None


def test_routing_table_owners() -> None:
    assert owner("/api/v1/report") == "ingest"
    assert owner("/api/v1/report-anthropic") == "ingest"
    assert owner("/api/v1/logs/abc") == "ingest"
    assert owner("/api/v1/chat/completions") == "router"
    assert owner("/api/v1/criteria/judge") == "judge"
    assert owner("/api/v1/criteria") == "api"
    assert owner("/api/v1/datasets/x/entries") == "api"
    assert owner("/api/v1/reports") == "api"  # whole segments only
    assert owner("/metrics") is None


@dataclass
class Service:
    name: str
    http_port: int
    grpc_port: int
    data_dir: Path
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def log(self) -> Path:
        return self.data_dir / "service.log"


@dataclass
class Topology:
    services: dict[str, Service]
    base_url: str
    chdb_path: Path
    secrets: list[str] = field(default_factory=list)

    def tails(self) -> str:
        parts = []
        for service in self.services.values():
            text = service.log.read_text(errors="replace") if service.log.exists() else ""
            parts.append(f"--- {service.name} ---\n{text[-3000:]}")
        return "\n".join(parts)


@pytest.fixture(scope="module")
def own_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TansuBroker]:
    """A broker of its own: the in-process platform of other tests must not share its topics."""
    broker = TansuBroker(free_port(), log_path=tmp_path_factory.mktemp("tansu") / "tansu.log")
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture(scope="module")
async def catalog_url(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    """A fresh Postgres database (SQLite when no Postgres runs here)."""
    try:
        admin = await asyncpg.connect(POSTGRES_ADMIN, timeout=3)
    except (OSError, asyncpg.PostgresError):
        yield f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('catalog') / 'catalog.db'}"
        return
    name = f"distillery_topology_{secrets.token_hex(4)}"
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def redis_url() -> str:
    """The local Redis when it answers (the router's response cache), else in-process."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", 6379), 1)
    except (OSError, TimeoutError):
        return ""
    writer.close()
    return "redis://127.0.0.1:6379/5"


def environment(service: Service, services: dict[str, Service], **shared: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DISTILLERY_", "OTEL_"))}
    env.update(shared)
    env.update(
        DISTILLERY_DATA_DIR=str(service.data_dir),
        DISTILLERY_HTTP_HOST="127.0.0.1",
        DISTILLERY_HTTP_PORT=str(service.http_port),
        DISTILLERY_GRPC_PORT=str(service.grpc_port),
        DISTILLERY_INGEST_GRPC_URL=f"127.0.0.1:{services['ingest'].grpc_port}",
        DISTILLERY_ROUTER_GRPC_URL=f"127.0.0.1:{services['router'].grpc_port}",
        DISTILLERY_LOG_LEVEL="INFO",
        PYTHONUNBUFFERED="1",
        HF_HUB_OFFLINE="1",
    )
    return env


def spawn(service: Service, env: dict[str, str]) -> subprocess.Popen:
    """``python -m services.<name>``, as the container's command; output to the service's log."""
    return subprocess.Popen(
        [sys.executable, "-m", f"services.{service.name}"],
        cwd=ROOT,
        env=env,
        stdout=service.log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def serve_proxy(services: dict[str, Service], port: int) -> web.AppRunner:
    """One entry point: forwards each request to the owning service, streaming the answer back."""
    session = aiohttp.ClientSession(auto_decompress=False, timeout=aiohttp.ClientTimeout(total=120))

    async def forward(request: web.Request) -> web.StreamResponse:
        target = owner(request.path)
        if target is None or target not in services:
            return web.json_response({"message": "not routed"}, status=404)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        url = f"{services[target].url}{request.rel_url}"
        async with session.request(request.method, url, data=await request.read(), headers=headers) as answer:
            response = web.StreamResponse(
                status=answer.status,
                headers={k: v for k, v in answer.headers.items() if k.lower() not in HOP_HEADERS},
            )
            await response.prepare(request)
            async for chunk in answer.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    app = web.Application(client_max_size=1024**3)
    app.router.add_route("*", "/{tail:.*}", forward)
    app.on_cleanup.append(lambda _: session.close())
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


@pytest.fixture(scope="module")
async def topology(
    tmp_path_factory: pytest.TempPathFactory,
    own_broker: TansuBroker,
    catalog_url: str,
    s3_url: str,
    fake_upstream: FakeUpstream,
) -> AsyncIterator[Topology]:
    root = tmp_path_factory.mktemp("topology")
    services = {name: Service(name, free_port(), free_port(), root / name) for name in SERVICES}
    chdb_path = root / "ingest-clickhouse"
    shared = dict(
        DISTILLERY_KAFKA_URL=own_broker.url,
        DISTILLERY_BLOB_URL=s3_url,
        DISTILLERY_SECRET_KEY=base64.b64encode(os.urandom(32)).decode(),
        DISTILLERY_BOOTSTRAP_API_KEY=BOOTSTRAP_KEY,
        DISTILLERY_KAFKA_HEARTBEAT_MS="300",
        DISTILLERY_KAFKA_SESSION_TIMEOUT_MS="3000",
        DISTILLERY_LOG_BATCH_MAX_MS="100",
        DISTILLERY_OPENAI_BASE_URL=f"{fake_upstream.base_url}/v1",
    )
    only = {
        "api": {"DISTILLERY_DATABASE_URL": catalog_url},
        "ingest": {"DISTILLERY_CLICKHOUSE_URL": f"chdb://{chdb_path}"},
        "router": {"DISTILLERY_REDIS_URL": await redis_url()},
        "relabel": {},
    }
    for service in services.values():
        service.data_dir.mkdir(parents=True)
        env = environment(service, services, **shared, **only[service.name])
        service.process = spawn(service, env)
    proxy_port = free_port()
    runner = await serve_proxy(services, proxy_port)
    topo = Topology(
        services,
        f"http://127.0.0.1:{proxy_port}/api/v1",
        chdb_path,
        secrets=[shared["DISTILLERY_SECRET_KEY"], BOOTSTRAP_KEY, OPENAI_KEY],
    )
    try:
        await wait_ready(topo)
        yield topo
    finally:
        await runner.cleanup()
        await asyncio.gather(*(asyncio.to_thread(stop, s.process) for s in services.values() if s.process))


async def wait_ready(topo: Topology) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    async with httpx.AsyncClient(timeout=5) as client:
        pending = set(topo.services)
        while pending:
            for name in list(pending):
                service = topo.services[name]
                if service.process.poll() is not None:
                    raise AssertionError(f"{name} exited with {service.process.returncode}\n{topo.tails()}")
                try:
                    if (await client.get(f"{service.url}/readyz")).status_code == 200:
                        pending.discard(name)
                except httpx.HTTPError:
                    pass
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"not ready within {START_TIMEOUT_S}s: {sorted(pending)}\n{topo.tails()}"
                )
            await asyncio.sleep(0.25)


def completion_request(content: str) -> dict:
    return {
        "model": "gpt-4o-mini",
        "messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": content}],
    }


@pytest.fixture(scope="module")
async def keyed(topology: Topology) -> Topology:
    """The project's OpenAI key set through the api; the router learns it from catalog.v1."""
    headers = {"Authorization": f"Bearer {BOOTSTRAP_KEY}"}
    async with httpx.AsyncClient(base_url=topology.base_url, headers=headers, timeout=30) as http:
        response = await http.put("/provider-keys", json={"openai": OPENAI_KEY})
        assert response.status_code == 200, response.text
    client = openai.AsyncOpenAI(api_key=BOOTSTRAP_KEY, base_url=topology.base_url, max_retries=0)

    async def router_knows_the_key() -> bool:
        try:
            await client.chat.completions.create(**completion_request("warm up"))
        except (openai.BadRequestError, openai.NotFoundError, openai.AuthenticationError):
            return False
        return True

    await wait_until(router_knows_the_key, timeout=30, what="the router to learn the key")
    return topology


async def test_sdk_flow_through_one_entry_point(keyed: Topology) -> None:
    topology = keyed
    base = topology.base_url
    headers = {"Authorization": f"Bearer {BOOTSTRAP_KEY}"}
    client = openai.AsyncOpenAI(api_key=BOOTSTRAP_KEY, base_url=base, max_retries=0)
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30) as http:
        # Logs reported with the openpipe SDK (ingest) and calls stored by the router (Kafka).
        op = AsyncOpenPipe(api_key=BOOTSTRAP_KEY, base_url=base)
        now = int(time.time() * 1000)
        request = completion_request("reported")
        answer = {
            "id": "chatcmpl-reported",
            "object": "chat.completion",
            "created": now // 1000,
            "model": "gpt-4o-mini",
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "message": {"role": "assistant", "content": "Reported answer"},
                }
            ],
        }
        await op.report(
            requested_at=now - 20, received_at=now, req_payload=request, resp_payload=answer, status_code=200
        )
        stored = await client.chat.completions.create(
            **completion_request("stored"), store=True, metadata={"flow": "topology"}
        )
        assert stored.choices[0].message.content
        streamed = await client.chat.completions.create(
            **completion_request("streamed"), store=True, stream=True, metadata={"flow": "topology"}
        )
        text = "".join([c.choices[0].delta.content or "" async for c in streamed if c.choices])
        assert text

        async def logged() -> bool:
            return (await http.get("/logs/count")).json().get("count") == 3

        await wait_until(logged, timeout=30, what="three logs in ClickHouse")
        tagged = (await http.get("/logs", params={"metadata.flow": "topology"})).json()["data"]
        assert len(tagged) == 2

        # The api reads the logs back from ingest over gRPC into a dataset.
        dataset = await op.create_dataset(name="topology")
        job = (await http.post(f"/datasets/{dataset.id}/import-logs", json={"filters": {}})).json()
        job = await finished_job(http, dataset.id, job["id"])
        assert job["status"] == "succeeded", job
        entries = (await http.get(f"/datasets/{dataset.id}/entries")).json()["data"]
        assert len(entries) == 3

        # The relabel worker asks the router over gRPC; the api applies its results from Kafka.
        response = await http.post(f"/datasets/{dataset.id}/relabel", json={"model": "gpt-4o-mini"})
        assert response.status_code in (200, 202), response.text
        relabel = await finished_job(http, dataset.id, response.json()["id"])
        assert relabel["status"] == "succeeded", relabel

        missing = await http.get("/nope/not/routed/here")
        assert missing.status_code == 404

    # Every process serves its own metrics; only ingest ever opened ClickHouse.
    async with httpx.AsyncClient(timeout=10) as direct:
        scraped = {name: (await direct.get(f"{s.url}/metrics")).text for name, s in topology.services.items()}
    assert 'route="/api/v1/report"' in scraped["ingest"]
    assert "distillery_ingest_logs_written_total" in scraped["ingest"]
    assert 'route="/api/v1/chat/completions"' in scraped["router"]
    assert "distillery_router_tokens_total{" in scraped["router"]
    assert 'route="/api/v1/datasets/{dataset_id}/import-logs"' in scraped["api"]
    assert topology.chdb_path.exists()
    # Logs are JSON lines carrying request ids, and never a secret.
    for name, service in topology.services.items():
        text = service.log.read_text(errors="replace")
        for secret in topology.secrets:
            assert secret not in text, f"{name} logged a secret"
        records = [json.loads(line) for line in text.splitlines() if line.strip()]  # every line
        assert records and all(r["service"] == name and r["level"] for r in records), name
    for name, service in topology.services.items():
        if name != "ingest":
            assert not (service.data_dir / "clickhouse").exists(), f"{name} opened ClickHouse"


async def finished_job(http: httpx.AsyncClient, dataset_id: str, job_id: str) -> dict:
    latest: dict = {}

    async def done() -> bool:
        nonlocal latest
        latest = (await http.get(f"/datasets/{dataset_id}/jobs/{job_id}")).json()
        return latest.get("status") in TERMINAL

    await wait_until(done, timeout=30, what=f"job {job_id}")
    return latest


# ---------------------------------------------------------------- the compose gateway, for real

NGINX_CONF = ROOT / "deploy" / "gateway" / "nginx.conf"


def nginx_binary() -> str:
    binary = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if binary is None:
        pytest.skip("nginx is not installed (.ci/run installs it); the gateway config is checked statically")
    return binary


def local_gateway_config(services: dict[str, Service], port: int, workdir: Path) -> Path:
    """deploy/gateway/nginx.conf as is, but listening on ``port`` with upstreams on this machine."""
    text = NGINX_CONF.read_text()
    text = text.replace("listen 8080;", f"listen 127.0.0.1:{port};").replace("/tmp/", f"{workdir}/")
    for name in re.findall(r"server (\w+):8080;", text):
        target = services[name].http_port if name in services else free_port()  # absent: answers 502
        text = text.replace(f"server {name}:8080;", f"server 127.0.0.1:{target};")
    path = workdir / "nginx.conf"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def gateway(keyed: Topology, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = nginx_binary()
    workdir = tmp_path_factory.mktemp("gateway")
    port = free_port()
    config = local_gateway_config(keyed.services, port, workdir)
    checked = subprocess.run(
        [binary, "-t", "-c", str(config), "-p", str(workdir)], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stderr
    process = subprocess.Popen(
        [binary, "-c", str(config), "-p", str(workdir), "-g", "daemon off;"],
        stdout=(workdir / "nginx.log").open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(process)


async def test_compose_gateway_config_routes_streams_and_passes_the_body_limit(gateway: str) -> None:
    headers = {"Authorization": f"Bearer {BOOTSTRAP_KEY}", "x-request-id": "gateway-test-1"}
    async with httpx.AsyncClient(base_url=f"{gateway}/api/v1", headers=headers, timeout=30) as http:
        await wait_until(lambda: gateway_up(gateway), timeout=15, what="nginx to listen")
        count = await http.get("/logs/count")  # ingest
        assert count.status_code == 200 and "count" in count.json()
        assert count.headers["x-request-id"] == "gateway-test-1"  # the caller's id reaches the service
        assert (await http.get("/datasets")).json()["object"] == "list"  # api
        # A body over the service's limit passes the gateway and gets the service's own 413.
        too_big = await http.post("/report", content=b"x" * (8 * 1024 * 1024 + 1))
        assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "request_too_large"
        missing = await http.get(f"{gateway}/not-the-api")
        assert missing.status_code == 404 and "message" in missing.json()
    # Server-sent events come through as they are written (the router streams a completion).
    client = openai.AsyncOpenAI(api_key=BOOTSTRAP_KEY, base_url=f"{gateway}/api/v1", max_retries=0)
    stream = await client.chat.completions.create(**completion_request("through nginx"), stream=True)
    chunks = [chunk async for chunk in stream]
    assert len(chunks) > 2 and "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


async def gateway_up(gateway: str) -> bool:
    try:
        async with httpx.AsyncClient() as client:
            return (await client.get(f"{gateway}/healthz")).json() == {"status": "ok"}
    except httpx.TransportError:
        return False
