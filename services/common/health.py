"""Readiness: ``GET /readyz`` answers 200 only when this process's own dependencies answer.

Every service needs the Kafka broker and the blob store it was configured with; ingest needs
ClickHouse, the api its catalog database, the router Redis when one is configured. Liveness
(``/healthz``) says only that the process serves HTTP: a dependency outage must take a pod out of
the load balancer, not restart it. Answers name the failing dependency and the error class,
never a URL (they carry credentials).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from fastapi.responses import JSONResponse

if TYPE_CHECKING:
    from services.platform import Platform

CHECK_TIMEOUT_SECONDS = 3.0
Check = Callable[[], Awaitable[Any]]


async def kafka_reachable(kafka_url: str) -> None:
    """At least one bootstrap server accepts a TCP connection."""
    errors: list[Exception] = []
    for server in kafka_url.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            _, writer = await asyncio.open_connection(host.strip("[]") or "localhost", int(port or 9092))
        except (OSError, ValueError) as exc:
            errors.append(exc)
            continue
        writer.close()
        return
    raise ConnectionError(f"no Kafka bootstrap server reachable ({len(errors)} tried)")


def checks_for(platform: Platform) -> dict[str, Check]:
    checks: dict[str, Check] = {
        "kafka": lambda: kafka_reachable(platform.settings.kafka_url),
        "blob_store": lambda: _blob_store_answers(platform.blobs),
    }
    ingest = platform.state.get("ingest")
    if ingest is not None:
        checks["clickhouse"] = ingest.clickhouse.ping
    sessions = platform.state.get("sessions")
    if sessions is not None:
        checks["database"] = lambda: _database_ping(sessions)
    if platform.settings.redis_url and "router" in platform.services:
        checks["redis"] = lambda: _redis_ping(platform.settings.redis_url)
    return checks


async def _blob_store_answers(blobs: Any) -> None:
    """A lookup of a key that need not exist: the answer (yes or no) is what counts."""
    await blobs.exists("readyz-probe")


async def _database_ping(sessions: Any) -> None:
    from sqlalchemy import text

    async with sessions() as session:
        await session.execute(text("SELECT 1"))


async def _redis_ping(url: str) -> None:
    from redis.asyncio import Redis

    client = Redis.from_url(url, socket_connect_timeout=CHECK_TIMEOUT_SECONDS)
    try:
        await client.ping()
    finally:
        await client.aclose()


async def run_checks(checks: dict[str, Check]) -> dict[str, str]:
    """``{name: "ok" | "<ErrorClass>"}``, every check run concurrently under one timeout."""

    async def one(check: Check) -> str:
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_SECONDS):
                result = await check()
        except Exception as exc:
            return type(exc).__name__
        return "unavailable" if result is False else "ok"

    names = list(checks)
    outcomes = await asyncio.gather(*(one(checks[name]) for name in names))
    return dict(zip(names, outcomes, strict=True))


async def readiness(platform: Platform) -> JSONResponse:
    started = time.perf_counter()
    results = await run_checks(checks_for(platform))
    ready = all(outcome == "ok" for outcome in results.values())
    body = {
        "status": "ready" if ready else "unavailable",
        "services": list(platform.services),
        "checks": results,
        "took_ms": round((time.perf_counter() - started) * 1000, 1),
    }
    return JSONResponse(body, status_code=200 if ready else 503)
