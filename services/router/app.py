"""Router wiring: the catalog projection, pooled upstream clients, cache, log shipper, routes, gRPC."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from services.common.http import API_PREFIX, BodySizeLimit
from services.common.kafka import AckedProducer
from services.common.secrets import internal_token
from services.router import inference_rpc
from services.router.cache import make_cache
from services.router.catalog import RouterCatalog
from services.router.criteria import setup_best_of_n
from services.router.embeddings import setup_embeddings
from services.router.fastpath import ChatCompletionsEndpoint
from services.router.log_shipper import LogShipper
from services.router.routing import ModelResolver
from services.router.service import ChatService, RouterDeps
from services.router.upstream import RetryPolicy, Upstream
from services.router.views import router

if TYPE_CHECKING:
    from services.platform import Platform


async def setup(platform: Platform) -> None:
    settings = platform.settings
    secret_key = platform.shared.secret_key
    platform.state["secret_key"] = secret_key
    catalog = RouterCatalog(secret_key)
    platform.catalog.handlers.append(catalog.apply)
    upstream = Upstream(
        timeout=settings.upstream_timeout_seconds,
        retry=RetryPolicy(
            max_retries=settings.upstream_max_retries,
            max_retry_after=settings.upstream_max_retry_after_seconds,
        ),
    )
    cache = make_cache(settings.redis_url, settings.cache_ttl_seconds, settings.cache_max_entries)
    log_producer = AckedProducer(settings.kafka_url, timeout=settings.publish_timeout_seconds)
    shipper = LogShipper(log_producer)
    chat = ChatService(
        resolver=ModelResolver(catalog, settings),
        upstream=upstream,
        cache=cache,
        shipper=shipper,
        max_concurrency=settings.project_max_concurrency,
    )
    chat.catalog_sync = partial(platform.catalog.sync, timeout=1.0)  # read your writes across processes
    deps = RouterDeps(chat)
    platform.state["router_deps"] = deps
    platform.state["chat"] = chat
    setup_best_of_n(platform, chat)  # op-criteria: judge every choice, sort by score
    platform.routers.append(router)
    endpoint = ChatCompletionsEndpoint(keyring=platform.keyring, deps=deps)
    platform.fast_routes[("POST", f"{API_PREFIX}/chat/completions")] = BodySizeLimit(
        endpoint, settings.max_body_bytes
    )
    platform.grpc_servicers.append(
        partial(
            inference_rpc.add_to_server,
            deps=deps,
            keyring=platform.keyring,
            internal_token=internal_token(settings),
        )
    )
    setup_embeddings(platform, chat, internal_token(settings))  # POST /embeddings, gRPC Embeddings

    async def start() -> None:
        await log_producer.start()
        shipper.start()

    async def flush_logs() -> None:
        await shipper.stop()

    async def close() -> None:
        await upstream.close()
        await cache.close()

    platform.on_started.append(start)
    # on_stopping runs last-added first: queued logs are published, then the producer stops.
    platform.on_stopping.append(log_producer.stop)
    platform.on_stopping.append(flush_logs)
    platform.on_stop.append(close)
