"""Ingest wiring: routes, the ClickHouse writer, gRPC LogQuery."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from services.common.clickhouse import ClickHouse
from services.common.secrets import internal_token
from services.ingest import grpc as log_query
from services.ingest import store
from services.ingest.consumers import register_log_writer
from services.ingest.views import IngestDeps, router

if TYPE_CHECKING:
    from services.platform import Platform


async def setup(platform: Platform) -> None:
    settings = platform.settings
    ch = ClickHouse(settings.resolved_clickhouse_url())
    await store.create_schema(ch)
    register_log_writer(platform.broker, ch, settings)
    platform.routers.append(router)
    platform.state["ingest"] = IngestDeps(
        broker=platform.broker, clickhouse=ch, publish_timeout=settings.publish_timeout_seconds
    )
    platform.grpc_servicers.append(
        partial(
            log_query.add_to_server,
            clickhouse=ch,
            keyring=platform.keyring,
            internal_token=internal_token(settings),
        )
    )

    async def close() -> None:
        ch.close()

    platform.on_stop.append(close)
