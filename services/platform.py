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
import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import grpc
import orjson
import uvicorn
from fastapi import APIRouter, FastAPI, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from services.common import health, metrics, tracing
from services.common.auth import KeyRing
from services.common.blobstore import blob_store_from_url
from services.common.catalog import CatalogReader
from services.common.errors import error_body, install_error_handlers
from services.common.http import API_PREFIX, BodySizeLimit, CoalescingHttpToolsProtocol
from services.common.kafka import ensure_topics, make_broker
from services.common.rpc import StrictRequests
from services.common.secrets import load_or_create_key
from services.common.settings import Settings

log = logging.getLogger(__name__)

# A worker thread running Python (the ClickHouse client encoding an insert, librdkafka's ack
# callbacks) keeps the GIL up to the switch interval while the event loop waits for it: Python's
# default 5 ms became requests' tail latency. ``bench/loop_lag.py`` measures both.
LOOP_SWITCH_INTERVAL = 0.0005

SERVICES = ("api", "ingest", "router", "relabel", "judge", "eval", "trainer", "serving")
Hook = Callable[[], Awaitable[None]]


def import_services(services: tuple[str, ...] = SERVICES) -> None:
    """Import every service's wiring module (the bulk of start-up CPU), e.g. while stores start."""
    for name in services:
        importlib.import_module(f"services.{name}.app")


class Shared:
    """Typed dependencies that more than one service's wiring uses, created on first use, so the
    order in which services are set up does not matter (``platform.state`` holds the rest)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._secret_key: bytes | None = None

    @property
    def secret_key(self) -> bytes:
        """Seals provider secrets: the api writes them with it, the router opens them."""
        if self._secret_key is None:
            self._secret_key = load_or_create_key(self._settings)
        return self._secret_key


class Platform:
    def __init__(self, settings: Settings, services: tuple[str, ...] = SERVICES) -> None:
        self.settings = settings
        self.services = services
        # graceful_timeout: on stop, each consumer finishes (and commits) the batch in hand.
        self.broker = make_broker(settings.kafka_url, graceful_timeout=settings.shutdown_timeout_seconds)
        self.blobs = blob_store_from_url(settings.resolved_blob_url())
        self.keyring = KeyRing()
        self.catalog = CatalogReader(settings.kafka_url, [self.keyring.apply])
        self.routers: list[APIRouter] = []
        self.grpc_servicers: list[Callable[[grpc.aio.Server], None]] = []
        self.on_started: list[Hook] = []  # after the broker and catalog are up
        self.on_stopping: list[Hook] = []  # before the broker stops (flush what must be published)
        self.on_stop: list[Hook] = []  # after it stops (close stores)
        self.state: dict[str, Any] = {}
        self.shared = Shared(settings)
        self.grpc_server: grpc.aio.Server | None = None
        # Set on SIGINT/SIGTERM: from then on every new request gets a 503 with Retry-After.
        self.stopping = False
        self.launched_at = time.monotonic()  # `distillery up` sets its process's launch time
        self._consumers: asyncio.Task | None = None
        # Set by PlatformServer: consumers start only once HTTP listens (their metadata decoding
        # and group joins would otherwise compete with start-up for the event loop).
        self.defer_consumers = False
        self._listening = asyncio.Event()
        self.app = self._build_app()
        # Framework-free handlers for the few hottest routes, by (method, path); see FastRoutes.
        self.fast_routes: dict[tuple[str, str], ASGIApp] = {}
        self.fast_routes[("GET", "/metrics")] = metrics.metrics_endpoint
        routes = FastRoutes(self.app, self.fast_routes, self)
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
        # Topics are created while the services set up (none of them needs a topic before the
        # broker connects below).
        topics = asyncio.create_task(ensure_topics(self.settings.kafka_url), name="ensure-topics")
        try:
            await self.blobs.ensure_ready()
            for name in self.services:
                module = importlib.import_module(f"services.{name}.app")
                await module.setup(self)
        finally:
            await topics
        for router in self.routers:
            self.app.include_router(router, prefix=API_PREFIX)
        for key, value in self.state.items():
            setattr(self.app.state, key, value)
        await self.broker.connect()  # publishing works from here
        # Consumer groups join in the background (Tansu holds each join for a while): requests are
        # served meanwhile and consumers start from their committed offsets whenever they join.
        self._consumers = asyncio.create_task(self._start_consumers(), name="start-consumers")
        await self.catalog.start()
        for hook in self.on_started:
            await hook()
        async with asyncio.timeout(30):
            await self.catalog.wait_caught_up()
        if self.grpc_servicers:
            await self._start_grpc()
        # Long-lived start-up objects never need scanning again, and a server allocating per
        # request spends less time in the collector with a larger young generation. (No
        # gc.collect() first: over every imported module it took 0.3-1.2 s of start-up.)
        gc.freeze()
        gc.set_threshold(50_000, 50, 100)
        log.info(
            "platform up: %s (%.1fs after launch)",
            ", ".join(self.services),
            time.monotonic() - self.launched_at,
        )

    def listening(self) -> None:
        """HTTP accepts connections: deferred consumers may start."""
        self._listening.set()

    async def _start_consumers(self) -> None:
        if self.defer_consumers:
            await self._listening.wait()
        started = time.monotonic()
        subscribers = list(self.broker.subscribers)
        results = await asyncio.gather(*(sub.start() for sub in subscribers), return_exceptions=True)
        for sub, result in zip(subscribers, results, strict=True):
            if isinstance(result, BaseException):
                log.error("consumer %s did not start: %s", sub.call_name, result)
        for publisher in self.broker.publishers:
            await publisher.start()
        self.broker.running = True
        log.info("%d consumers joined in %.1fs", len(subscribers), time.monotonic() - started)

    async def wait_consumers(self) -> None:
        """Until every consumer has joined its group (tests and benchmarks that need them)."""
        if self._consumers is not None:
            await asyncio.shield(self._consumers)

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
        """Stop every part even if some cannot stop cleanly (say, the broker is already gone).

        Order: (HTTP already refuses new requests and has finished those in flight) gRPC, the
        hooks that flush what must be published, then the consumers, each finishing the batch
        in hand and committing it (bounded by ``shutdown_timeout_seconds``), then the stores."""
        self.stopping = True
        if self.grpc_server:
            await _stop_quietly("gRPC server", self.grpc_server.stop(grace=2))
        for hook in reversed(self.on_stopping):
            await _stop_quietly(hook.__qualname__, hook())
        if self._consumers is not None and not self._consumers.done():
            self._consumers.cancel()
            await asyncio.gather(self._consumers, return_exceptions=True)
        await _stop_quietly(
            "Kafka clients", self.broker.stop(), timeout=self.settings.shutdown_timeout_seconds
        )
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


STOPPING_BODY = orjson.dumps(
    error_body(
        503,
        "the platform is shutting down; retry shortly",
        type="service_unavailable",
        param=None,
        code="shutting_down",
    )
)


async def _refuse_while_stopping(send: Send) -> None:
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(STOPPING_BODY)).encode()),
        (b"retry-after", b"2"),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": STOPPING_BODY})


class FastRoutes:
    """The ASGI entry point: the hottest routes go straight to their handlers, all else to FastAPI.

    Once the platform is stopping, every new request gets a 503 with ``Retry-After``."""

    def __init__(
        self, app: ASGIApp, routes: dict[tuple[str, str], ASGIApp], platform: Platform | None = None
    ) -> None:
        self.app = app
        self.routes = routes
        self.platform = platform

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.platform is not None and self.platform.stopping and scope["type"] == "http":
            await _refuse_while_stopping(send)
            return
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
        log_config=None,  # uvicorn's records go through the root handler (JSON lines, tracing.setup)
        access_log=False,
        http=CoalescingHttpToolsProtocol,  # one socket write per response
        proxy_headers=False,  # nothing reads the client's address; X-Forwarded-* parsing is per request
        lifespan="on",
        timeout_graceful_shutdown=max(1, int(platform.settings.shutdown_timeout_seconds / 2)),
    )
    await PlatformServer(config, platform).serve()


class PlatformServer(uvicorn.Server):
    """uvicorn, but a signal first makes the platform refuse new requests (503 + Retry-After)
    and arms a watchdog: past ``shutdown_timeout_seconds`` the process exits regardless (what
    was acknowledged is in the broker already; children die with the process)."""

    def __init__(self, config: uvicorn.Config, platform: Platform) -> None:
        super().__init__(config)
        self.platform = platform
        platform.defer_consumers = True

    async def startup(self, sockets: list | None = None) -> None:
        await super().startup(sockets)
        self.platform.listening()

    def handle_exit(self, sig: int, frame: object) -> None:
        if not self.platform.stopping:
            self.platform.stopping = True
            log.info("signal %d: refusing new requests, draining", sig)
            limit = self.platform.settings.shutdown_timeout_seconds + 5
            watchdog = threading.Timer(limit, _exit_now, args=(limit,))
            watchdog.daemon = True
            watchdog.start()
        super().handle_exit(sig, frame)  # type: ignore[arg-type]


def _exit_now(limit: float) -> None:
    log.error("shutdown took longer than %.0fs; exiting now", limit)
    os._exit(3)


def run(platform: Platform) -> None:
    """Serve the platform on uvloop (measurably faster than the default loop) until it is stopped."""
    import uvloop

    tracing.setup(platform.services[0] if len(platform.services) == 1 else "platform")
    sys.setswitchinterval(LOOP_SWITCH_INTERVAL)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(platform))
