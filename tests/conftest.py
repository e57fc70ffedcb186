"""Shared fixtures: a real Tansu broker, one chDB path (chDB allows one per process), a running platform.

The platform is started once per session and served over real HTTP by uvicorn, so the
official SDKs talk to it exactly as they would in production. Tests isolate themselves
by creating their own project (and so their own API key).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
import pytest
import uvicorn

from services.api.projects import service as projects
from services.common.kafka import TansuBroker, free_port
from services.common.settings import Settings
from services.platform import Platform
from tests.fake_upstream import ANTHROPIC_KEY, GEMINI_KEY, OPENAI_KEY, FakeUpstream, start_fake_upstream
from tests.helpers import wait_for_router

pytest_plugins = ["tests.s3_server"]  # the `s3_url` fixture: a real S3 endpoint (SeaweedFS)

BOOTSTRAP_KEY = "opk_test_bootstrap_key"


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("distillery")


@pytest.fixture(scope="session")
def tansu(data_root: Path) -> TansuBroker:
    broker = TansuBroker(free_port(), log_path=data_root / "tansu.log")
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def chdb_url(data_root: Path) -> str:
    return f"chdb://{data_root / 'clickhouse'}"


def platform_settings(data_root: Path, kafka_url: str, chdb_url: str, **overrides: object) -> Settings:
    """Settings for a platform under test: fast consumer groups, short batches, short retries."""
    values: dict[str, object] = dict(
        data_dir=data_root,
        kafka_url=kafka_url,
        clickhouse_url=chdb_url,
        bootstrap_api_key=BOOTSTRAP_KEY,
        http_port=free_port(),
        grpc_port=free_port(),
        kafka_heartbeat_ms=300,
        kafka_session_timeout_ms=3000,
        log_batch_max_ms=100,
        log_insert_retry_seconds=3.0,
    )
    values.update(overrides)
    return Settings(**values)


POSTGRES_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


@pytest.fixture(params=["sqlite", "postgres"])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh, empty catalog database on each engine the api supports (Postgres: the local server)."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'catalog.db'}"
        return
    name = f"distillery_test_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(POSTGRES_ADMIN)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@dataclass
class RunningPlatform:
    platform: Platform
    base_url: str

    @property
    def settings(self) -> Settings:
        return self.platform.settings


async def serve_in_background(platform: Platform) -> tuple[uvicorn.Server, asyncio.Task]:
    config = uvicorn.Config(
        platform.asgi, host="127.0.0.1", port=platform.settings.http_port, log_level="warning", lifespan="on"
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    deadline = time.monotonic() + 60
    while not server.started:
        if task.done():
            task.result()  # raises the start-up error
        if time.monotonic() > deadline:
            raise RuntimeError("platform did not start within 60s")
        await asyncio.sleep(0.05)
    return server, task


@pytest.fixture(scope="session")
async def fake_upstream() -> AsyncIterator[FakeUpstream]:
    """OpenAI, Anthropic and Gemini, faked at the HTTP boundary (see tests/fake_upstream.py)."""
    fake, server, task = await start_fake_upstream(free_port())
    yield fake
    server.should_exit = True
    await task


@pytest.fixture(scope="session")
async def running(
    data_root: Path, tansu: TansuBroker, chdb_url: str, fake_upstream: FakeUpstream
) -> AsyncIterator[RunningPlatform]:
    platform = Platform(
        platform_settings(
            data_root,
            tansu.url,
            chdb_url,
            openai_base_url=f"{fake_upstream.base_url}/v1",
            anthropic_base_url=fake_upstream.base_url,
            gemini_base_url=fake_upstream.base_url,
        )
    )
    server, task = await serve_in_background(platform)
    yield RunningPlatform(platform, f"http://127.0.0.1:{platform.settings.http_port}/api/v1")
    server.should_exit = True
    await task


@dataclass
class Project:
    id: str
    key: str
    base_url: str

    def client(self, **kwargs: object) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.base_url, headers={"Authorization": f"Bearer {self.key}"}, timeout=30, **kwargs
        )


@pytest.fixture
async def make_project(running: RunningPlatform) -> Callable[[], Awaitable[Project]]:
    """A fresh project with its own key, created the way the api does it (and published on catalog.v1)."""

    async def make() -> Project:
        sessions = running.platform.state["sessions"]
        async with sessions.begin() as session:
            project = await projects.create_project(session=session, name=f"test-{secrets.token_hex(6)}")
            row, key = await projects.add_api_key(session=session, project_id=project.id)
        await projects.publish_keys(broker=running.platform.broker, keys=[row])
        await wait_until(lambda: running.platform.keyring.project_for(key) is not None, what="key on catalog")
        return Project(project.id, key, running.base_url)

    return make


@pytest.fixture
async def project(make_project: Callable[[], Awaitable[Project]]) -> Project:
    return await make_project()


async def wait_until(check: Callable[[], object], *, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.1)


async def wait_for_count(
    client: httpx.AsyncClient, expected: int, *, params: dict | None = None, timeout: float = 20.0
) -> int:
    """Poll ``/logs/count`` until it reaches ``expected``; returns the final count."""
    last = -1

    async def reached() -> bool:
        nonlocal last
        response = await client.get("/logs/count", params=params or {})
        assert response.status_code == 200, response.text
        last = response.json()["count"]
        return last >= expected

    try:
        await wait_until(reached, timeout=timeout, what=f"{expected} logs")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last count was {last}") from None
    return last


@pytest.fixture
async def keyed(project: Project) -> Project:
    """A project with OpenAI, Anthropic and Gemini keys configured through the API."""
    async with project.client() as client:
        response = await client.put(
            "/provider-keys", json={"openai": OPENAI_KEY, "anthropic": ANTHROPIC_KEY, "gemini": GEMINI_KEY}
        )
        assert response.status_code == 200, response.text
    return project


@pytest.fixture
async def ready(keyed: Project) -> Project:
    """``keyed``, once the router can serve with its keys."""
    await wait_for_router(keyed)
    return keyed
