"""Ingest wiring: routes, the ClickHouse writer, gRPC LogQuery."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from services.common.clickhouse import ClickHouse
from services.common.http import API_PREFIX, BodySizeLimit
from services.common.kafka import AckedProducer
from services.common.secrets import internal_token
from services.ingest import log_query, store
from services.ingest.analytics import register_analytics_writers
from services.ingest.consumers import KnownProjects, register_log_writer
from services.ingest.fastpath import ReportEndpoint
from services.ingest.service import REPORT_MODELS, IngestDeps
from services.ingest.views import router

if TYPE_CHECKING:
    from services.platform import Platform

# Durable Tansu writes an S3 object per produce request and reads them back for each fetch, so
# short batches cost it CPU; long ones cap /report at (requests in flight / ack latency). At 200 in
# flight (bench/ingest.py, 2026-11-30): 5 ms 5.5k req/s with Tansu at 0.69 cores and the writer
# ~1 s behind; 10 ms 4.4-5.1k at 0.5; 15 ms 4.6-5.1k at 0.37; 25 ms 4.2k (latency-bound) at 0.3.
# Once the writer fetched in larger batches (``log_fetch_min_bytes``) the platform had CPU to spare:
# 10 ms 5.2-5.6k req/s (Tansu 0.52 cores), 15 ms 4.8-5.1k (Tansu 0.37-0.40), alternate runs.
REPORT_LINGER_MS = 10


async def setup(platform: Platform) -> None:
    settings = platform.settings
    ch = ClickHouse(settings.resolved_clickhouse_url())
    await store.create_schema(ch)
    writer = register_log_writer(
        platform.broker, ch, settings, projects=KnownProjects(platform.keyring, platform.catalog)
    )
    register_analytics_writers(platform.broker, ch, settings)
    platform.routers.append(router)
    producer = AckedProducer(
        settings.kafka_url, timeout=settings.publish_timeout_seconds, linger_ms=REPORT_LINGER_MS
    )
    await producer.start()
    deps = IngestDeps(producer=producer, clickhouse=ch)
    platform.state["ingest"] = deps
    for route in REPORT_MODELS:
        endpoint = ReportEndpoint(route, keyring=platform.keyring, deps=deps)
        platform.fast_routes[("POST", f"{API_PREFIX}{route}")] = BodySizeLimit(
            endpoint, settings.max_body_bytes
        )
    platform.grpc_servicers.append(
        partial(
            log_query.add_to_server,
            clickhouse=ch,
            keyring=platform.keyring,
            internal_token=internal_token(settings),
        )
    )

    async def stop_producer() -> None:
        await producer.stop()

    async def close() -> None:
        ch.close()

    platform.on_stopping.append(writer.close)
    platform.on_stopping.append(stop_producer)
    platform.on_stop.append(close)
