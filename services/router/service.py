"""The inference path: limits, cache, routing, pruning, fallback, logging (mixture of agents: moa.py)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, aclosing, asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

from services.common import metrics
from services.common.errors import APIError
from services.common.events import LogEvent
from services.common.log_fields import merge_metadata, new_log_id
from services.common.pruning import apply_pruning_rules
from services.router import moa
from services.router.cache import ResponseCache, cache_key
from services.router.log_shipper import LogShipper
from services.router.protocol import CallOptions, error_chunk, upstream_body
from services.router.providers.anthropic import AnthropicProvider
from services.router.providers.base import Provider
from services.router.providers.gemini import GeminiProvider
from services.router.providers.openai import OpenAIProvider
from services.router.routing import ModelResolver, Route, moa_base
from services.router.streaming import DONE, completion_to_chunks, merge_chunks, sse, without_usage
from services.router.upstream import Upstream

log = logging.getLogger(__name__)
# Resolver misses that a catalog record still on its way over catalog.v1 would turn into a route.
CATALOG_MISSES = ("model_not_found", "provider_key_missing")
T = TypeVar("T")


@dataclass
class Outcome:
    """What happened, for the log: the answer or the error, and how it was produced."""

    completion: dict[str, Any] | None = None
    error: APIError | None = None
    cache_hit: bool = False
    route: Route | None = None
    notes: dict[str, str] = field(default_factory=dict)


class ProjectLimiter:
    """Caps in-flight calls per project; past the cap the caller gets a 429 at once."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._in_flight: dict[str, int] = defaultdict(int)

    @asynccontextmanager
    async def slot(self, project_id: str) -> AsyncIterator[None]:
        if self._in_flight[project_id] >= self.limit:
            raise APIError(
                429,
                f"Too many concurrent requests for this project (limit {self.limit}). Retry shortly.",
                type="rate_limit_error",
                code="concurrency_limit",
            )
        self._in_flight[project_id] += 1
        try:
            yield
        finally:
            self._in_flight[project_id] -= 1


def client_closed(message: str = "the client cancelled the request before it ended") -> APIError:
    return APIError(499, message, code="client_closed_request")


def _cost(route: Route, completion: dict[str, Any]) -> float | None:
    if route.input_price_per_million is None or route.output_price_per_million is None:
        return None
    usage = completion.get("usage") or {}
    return (
        usage.get("prompt_tokens", 0) * route.input_price_per_million
        + usage.get("completion_tokens", 0) * route.output_price_per_million
    ) / 1_000_000


class ChatService:
    def __init__(
        self,
        *,
        resolver: ModelResolver,
        upstream: Upstream,
        cache: ResponseCache,
        shipper: LogShipper | None,
        max_concurrency: int,
    ) -> None:
        self.resolver = resolver
        self.upstream = upstream
        self.cache = cache
        self.shipper = shipper
        self.limiter = ProjectLimiter(max_concurrency)
        self.best_of_n: Any = None  # services.router.criteria.BestOfN, when criteria are wired
        # Waits until catalog.v1 is read to its end (CatalogReader.sync); set by the wiring.
        self.catalog_sync: Callable[[], Awaitable[bool]] | None = None
        openai = OpenAIProvider()
        self.providers: dict[str, Provider] = {
            "openai": openai,
            "azure": openai,
            "anthropic": AnthropicProvider(),
            "gemini": GeminiProvider(),
        }

    # --- cache (a cache outage degrades to no cache; it never fails the call) -------------------

    async def _cache_get(self, key: str) -> dict[str, Any] | None:
        try:
            return await self.cache.get(key)
        except Exception as exc:
            log.warning("response cache read failed (%s); answering without it", type(exc).__name__)
            return None

    async def _cache_set(self, key: str, completion: dict[str, Any]) -> None:
        try:
            await self.cache.set(key, completion)
        except Exception as exc:
            log.warning("response cache write failed (%s); answer not cached", type(exc).__name__)

    async def resolve(self, project_id: str, model: str) -> Route:
        """The route for ``model``; on a miss, first catch up with ``catalog.v1`` and look again,
        so a provider or deployment written through another api process a moment ago is found
        (read your writes across processes; within one process writes are applied at once)."""
        try:
            return self.resolver.resolve(project_id, model)
        except APIError as exc:
            if exc.code not in CATALOG_MISSES or self.catalog_sync is None or not await self.catalog_sync():
                raise
        return self.resolver.resolve(project_id, model)

    # --- one completion ------------------------------------------------------------------------

    async def complete(self, *, project_id: str, raw: dict[str, Any], options: CallOptions) -> dict[str, Any]:
        if options.criteria and self.best_of_n is not None:
            return await self.best_of_n.complete(self, project_id=project_id, raw=raw, options=options)
        requested_at = int(time.time() * 1000)
        outcome = Outcome()
        try:
            async with self.limiter.slot(project_id):
                key = cache_key(project_id, raw)
                if options.reads_cache and (cached := await self._cache_get(key)) is not None:
                    outcome.completion, outcome.cache_hit = cached, True
                    return cached
                call = partial(self._call, project_id, outcome=outcome)
                outcome.completion = await self._with_fallback(call, raw, options, outcome)
                if options.writes_cache:
                    await self._cache_set(key, outcome.completion)
                return outcome.completion
        except APIError as exc:
            outcome.error = exc
            raise
        except asyncio.CancelledError:  # the caller left (a gRPC deadline, say): not a success
            outcome.error = client_closed()
            raise
        finally:
            self._log(project_id, raw, options, requested_at, outcome)

    async def _with_fallback(
        self,
        attempt: Callable[[dict[str, Any], float | None], Awaitable[T]],
        raw: dict[str, Any],
        options: CallOptions,
        outcome: Outcome,
    ) -> T:
        """``attempt(raw, timeout)``; when it fails and the call has a fallback, once more with the
        fallback model (no timeout), noting why on the log. Completions and streams alike."""
        fallback = options.fallback
        timeout = fallback.timeout / 1000 if fallback and fallback.timeout else None
        try:
            return await attempt(raw, timeout)
        except APIError as exc:
            if fallback is None:
                raise
            outcome.notes.update({"$fallback.from": raw["model"], "$fallback.reason": exc.message[:300]})
            metrics.ROUTER_FALLBACKS.labels(metrics.model_label(raw["model"]), fallback.model[:100]).inc()
            return await attempt({**raw, "model": fallback.model}, None)

    async def _call(
        self, project_id: str, raw: dict[str, Any], timeout: float | None, *, outcome: Outcome
    ) -> dict[str, Any]:
        model = raw["model"]
        if (base := moa_base(model)) is not None:
            route = await self.resolve(project_id, base)
            body = self._prepare(route, {**raw, "model": base})
            final = await moa.complete(
                self.providers[route.provider], self.upstream, route, body, model=model, timeout=timeout
            )
            outcome.notes["$moa.drafts"] = str(moa.DRAFTS)
            return final
        route = await self.resolve(project_id, model)
        body = self._prepare(route, raw)
        outcome.route = route
        return await self.providers[route.provider].complete(
            self.upstream, route, body, model=model, timeout=timeout
        )

    @staticmethod
    def _prepare(route: Route, raw: dict[str, Any]) -> dict[str, Any]:
        body = upstream_body(raw)
        if route.pruning_rules:
            body["messages"] = apply_pruning_rules(body["messages"], route.pruning_rules)
        if route.default_temperature is not None and body.get("temperature") is None:
            body["temperature"] = route.default_temperature
        return body

    # --- streaming -----------------------------------------------------------------------------

    async def respond(
        self, *, project_id: str, raw: dict[str, Any], options: CallOptions, stream: bool
    ) -> dict[str, Any] | AsyncGenerator[dict[str, Any], None]:
        """The one entry point of every transport (fast path, FastAPI view, gRPC): a completion,
        or when ``stream`` its chunks (``open_chunks``; HTTP sends them through ``as_sse``)."""
        if stream:
            return await self.open_chunks(project_id=project_id, raw=raw, options=options)
        return await self.complete(project_id=project_id, raw=raw, options=options)

    async def open_chunks(
        self, *, project_id: str, raw: dict[str, Any], options: CallOptions
    ) -> AsyncGenerator[dict[str, Any], None]:
        """Everything that can fail with a clean error happens before this returns; the returned
        iterator yields ``chat.completion.chunk`` dicts, raises ``APIError`` when the stream
        breaks, and logs the merged call once it ends or breaks (close it if you stop early)."""
        requested_at = int(time.time() * 1000)
        outcome = Outcome()
        stack = AsyncExitStack()
        include_usage = bool((raw.get("stream_options") or {}).get("include_usage"))
        try:
            await stack.enter_async_context(self.limiter.slot(project_id))
            key = cache_key(project_id, raw)
            if options.reads_cache and (cached := await self._cache_get(key)) is not None:
                outcome.completion, outcome.cache_hit = cached, True
                chunks = _iterate(completion_to_chunks(cached, include_usage=include_usage))
            elif moa_base(raw["model"]) is not None:
                call = partial(self._call, project_id, outcome=outcome)
                completion = await self._with_fallback(call, raw, options, outcome)
                chunks = _iterate(completion_to_chunks(completion, include_usage=include_usage))
            else:
                open_stream = partial(self._open, stack, project_id, outcome=outcome)
                chunks = await self._with_fallback(open_stream, raw, options, outcome)
        except BaseException as exc:
            await stack.aclose()
            if isinstance(exc, APIError):
                outcome.error = exc
                self._log(project_id, raw, options, requested_at, outcome)
            raise
        relayed = self._relay(stack, chunks, project_id, raw, options, requested_at, outcome, key)
        return relayed if include_usage else without_usage(relayed)

    async def _open(
        self,
        stack: AsyncExitStack,
        project_id: str,
        raw: dict[str, Any],
        timeout: float | None,
        *,
        outcome: Outcome,
    ) -> AsyncIterator[dict[str, Any]]:
        route = await self.resolve(project_id, raw["model"])
        body = self._prepare(route, raw)
        if route.provider != "azure":  # older Azure api-versions refuse stream_options
            # Always ask for the usage tail, so that the call is logged and priced with real token
            # counts; _relay drops it again for a client that did not ask.
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        outcome.route = route
        stream = self.providers[route.provider].stream(
            self.upstream, route, body, model=raw["model"], timeout=timeout
        )
        return await stack.enter_async_context(stream)

    async def _relay(
        self,
        stack: AsyncExitStack,
        chunks: AsyncIterator[dict[str, Any]],
        project_id: str,
        raw: dict[str, Any],
        options: CallOptions,
        requested_at: int,
        outcome: Outcome,
        key: str,
    ) -> AsyncGenerator[dict[str, Any], None]:
        seen: list[dict[str, Any]] = []
        finished = False
        try:
            async for chunk in chunks:
                seen.append(chunk)
                yield chunk
            finished = True
        except APIError as exc:
            outcome.error = exc
            raise
        finally:
            await stack.aclose()
            if not outcome.cache_hit:
                outcome.completion = merge_chunks(seen) or outcome.completion
                if not finished and outcome.error is None:
                    outcome.error = client_closed("the client closed the stream before it ended")
                if finished and options.writes_cache and outcome.completion:
                    await self._cache_set(key, outcome.completion)
            self._log(project_id, raw, options, requested_at, outcome)

    # --- logging -------------------------------------------------------------------------------

    def _log(
        self, project_id: str, raw: dict[str, Any], options: CallOptions, requested_at: int, outcome: Outcome
    ) -> None:
        hit = outcome.cache_hit if options.reads_cache else None
        metrics.observe_completion(raw.get("model"), outcome.completion, outcome.route, cache_hit=hit)
        if not options.log_request or self.shipper is None:
            return
        error = outcome.error
        response: Any = outcome.completion
        if error is not None and response is None:
            response = error_chunk(error.message, type=error.type, code=error.code)
        self.shipper.ship(
            LogEvent(
                log_id=new_log_id(),
                project_id=project_id,
                source="openai",
                requested_at=requested_at,
                received_at=int(time.time() * 1000),
                req_payload={k: v for k, v in raw.items() if k != "openpipe"},
                resp_payload=response,
                status_code=error.status_code if error else 200,
                error_message=error.message if error else None,
                cache_hit=outcome.cache_hit,
                cost_usd=_cost(outcome.route, outcome.completion)
                if outcome.route and outcome.completion
                else None,
                metadata=merge_metadata(raw.get("metadata"), options.tags, outcome.notes),
            )
        )


@dataclass
class RouterDeps:
    """What every chat transport (fast path, FastAPI views, gRPC) reads per call, wired once in
    ``app.py``: replacing ``chat`` here replaces it for all of them."""

    chat: ChatService


async def as_sse(chunks: AsyncGenerator[dict[str, Any], None]) -> AsyncIterator[bytes]:
    """Chunks as server-sent events: an error mid-stream becomes an error event, and the stream
    always ends with ``[DONE]``."""
    async with aclosing(chunks):  # a client that leaves early still gets its call logged now
        try:
            async for chunk in chunks:
                yield sse(chunk)
        except APIError as exc:
            yield sse(error_chunk(exc.message, type=exc.type, code=exc.code))
        yield DONE


async def _iterate(items: list[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    for item in items:
        yield item
