"""The composition root: assembles chosen services over one broker, one HTTP app, one gRPC server.

``python -m services.<name>`` runs one service; ``distillery up`` runs them all in one
process. Either way each service's ``setup(platform)`` adds its routes, Kafka
subscribers, gRPC servicers and start/stop hooks here.
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import grpc
import uvicorn
from fastapi import APIRouter, FastAPI, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from services.common import health, metrics, tracing
from services.common.auth import KeyRing
from services.common.blobstore import blob_store_from_url
from services.common.catalog import CatalogReader
from services.common.errors import install_error_handlers
from services.common.http import API_PREFIX, BodySizeLimit
from services.common.kafka import ensure_topics, make_broker
from services.common.rpc import StrictRequests
from services.common.settings import Settings

log = logging.getLogger(__name__)

SERVICES = ("api", "ingest", "router", "relabel", "judge")
Hook = Callable[[], Awaitable[None]]


class Platform:
    def __init__(self, settings: Settings, services: tuple[str, ...] = SERVICES) -> None:
        self.settings = settings
        self.services = services
        self.broker = make_broker(settings.kafka_url)
        self.blobs = blob_store_from_url(settings.resolved_blob_url())
        self.keyring = KeyRing()
        self.catalog = CatalogReader(settings.kafka_url, [self.keyring.apply])
        self.routers: list[APIRouter] = []
        self.grpc_servicers: list[Callable[[grpc.aio.Server], None]] = []
        self.on_started: list[Hook] = []  # after the broker and catalog are up
        self.on_stopping: list[Hook] = []  # before the broker stops (flush what must be published)
        self.on_stop: list[Hook] = []  # after it stops (close stores)
        self.state: dict[str, Any] = {}
        self.grpc_server: grpc.aio.Server | None = None
        self.app = self._build_app()
        # Framework-free handlers for the few hottest routes, by (method, path); see FastRoutes.
        self.fast_routes: dict[tuple[str, str], ASGIApp] = {}
        self.fast_routes[("GET", "/metrics")] = metrics.metrics_endpoint
        routes = FastRoutes(self.app, self.fast_routes)
        self.asgi = metrics.HttpMetrics(tracing.TraceRequests(routes), self.fast_routes)

    def _build_app(self) -> FastAPI:
        app = FastAPI(title="Distillery", lifespan=self._lifespan)
        install_error_handlers(app)
        app.state.keyring = self.keyring
        app.state.broker = self.broker

        @app.get("/healthz", include_in_schema=False)
        async def healthz() -> dict:
            return {"status": "ok", "services": list(self.services)}

        @app.get("/readyz", include_in_schema=False)
        async def readyz() -> Response:
            return await health.readiness(self)

        app.add_middleware(BodySizeLimit, max_bytes=self.settings.max_body_bytes)
        return app

    @asynccontextmanager
    async def _lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        await self.start()
        try:
            yield
        finally:
            await self.stop()

    async def start(self) -> None:
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        await ensure_topics(self.settings.kafka_url)
        await self.blobs.ensure_ready()
        for name in self.services:
            module = importlib.import_module(f"services.{name}.app")
            await module.setup(self)
        for router in self.routers:
            self.app.include_router(router, prefix=API_PREFIX)
        for key, value in self.state.items():
            setattr(self.app.state, key, value)
        await self.broker.start()
        await self.catalog.start()
        for hook in self.on_started:
            await hook()
        async with asyncio.timeout(30):
            await self.catalog.wait_caught_up()
        if self.grpc_servicers:
            await self._start_grpc()
        # Long-lived start-up objects never need scanning again, and a server allocating per
        # request spends less time in the collector with a larger young generation.
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 50, 100)
        log.info("platform up: %s", ", ".join(self.services))

    async def _start_grpc(self) -> None:
        limit = self.settings.max_body_bytes * 4  # a log carries raw and normalized payloads
        self.grpc_server = grpc.aio.server(
            # Body limit as for HTTP; the caller's trace context continues from the call metadata.
            interceptors=[StrictRequests(max_bytes=self.settings.max_body_bytes), tracing.ServerTracing()],
            options=[("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)],
        )
        for add in self.grpc_servicers:
            add(self.grpc_server)
        address = f"{self.settings.http_host}:{self.settings.grpc_port}"
        if self.grpc_server.add_insecure_port(address) == 0:
            raise RuntimeError(f"cannot bind gRPC on {address}")
        await self.grpc_server.start()

    async def stop(self) -> None:
        """Stop every part even if some cannot stop cleanly (say, the broker is already gone)."""
        if self.grpc_server:
            await _stop_quietly("gRPC server", self.grpc_server.stop(grace=2))
        for hook in reversed(self.on_stopping):
            await _stop_quietly(hook.__qualname__, hook())
        await _stop_quietly("Kafka clients", self.broker.stop())
        await _stop_quietly("catalog reader", self.catalog.stop())
        for hook in reversed(self.on_stop):
            await _stop_quietly(hook.__qualname__, hook())


async def _stop_quietly(what: str, stopping: Awaitable[object], timeout: float = 10.0) -> None:
    task = asyncio.ensure_future(stopping)
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:
        task.cancel()
        log.warning("stopping %s took longer than %.0fs; abandoned", what, timeout)
    elif not task.cancelled() and task.exception() is not None:
        exc = task.exception()
        log.warning("stopping %s failed: %s: %s", what, type(exc).__name__, exc)


class FastRoutes:
    """The ASGI entry point: the hottest routes go straight to their handlers, all else to FastAPI."""

    def __init__(self, app: ASGIApp, routes: dict[tuple[str, str], ASGIApp]) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler = (
            self.routes.get((scope.get("method", ""), scope.get("path", "")))
            if scope["type"] == "http"
            else None
        )
        await (handler or self.app)(scope, receive, send)


async def serve(platform: Platform) -> None:
    """Serve HTTP (and gRPC) until SIGINT/SIGTERM, then shut everything down cleanly."""
    config = uvicorn.Config(
        platform.asgi,
        host=platform.settings.http_host,
        port=platform.settings.http_port,
        log_level="warning",
        access_log=False,
        lifespan="on",
    )
    await uvicorn.Server(config).serve()


def run(platform: Platform) -> None:
    """Serve the platform on uvloop (measurably faster than the default loop) until it is stopped."""
    import uvloop

    tracing.setup(platform.services[0] if len(platform.services) == 1 else "platform")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(platform))
