"""Anthropic Messages API behind the OpenAI chat interface (``anthropic:<model>``)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from services.common.errors import bad_request
from services.router.providers import anthropic_translate as translate
from services.router.providers.base import translated_chunks
from services.router.providers.translation import TranslationError
from services.router.routing import Route
from services.router.upstream import Upstream

API_VERSION = "2023-06-01"


def _request(route: Route, body: dict[str, Any], *, stream: bool) -> dict[str, Any]:
    try:
        request = translate.to_anthropic_request(body, route.upstream_model)
    except TranslationError as exc:
        raise bad_request(f"anthropic: {exc.message}", param=exc.param) from None
    request["stream"] = stream
    return request


def _headers(route: Route) -> dict[str, str]:
    return {"x-api-key": route.api_key or "", "anthropic-version": API_VERSION}


class AnthropicProvider:
    name = "anthropic"

    async def complete(
        self, upstream: Upstream, route: Route, body: dict[str, Any], *, model: str, timeout: float | None
    ) -> dict[str, Any]:
        response = await upstream.post_json(
            self.name,
            route.base_url,
            "/v1/messages",
            _request(route, body, stream=False),
            headers=_headers(route),
            timeout=timeout,
        )
        return translate.from_anthropic_response(response, model=model, created=int(time.time()))

    @asynccontextmanager
    async def stream(
        self, upstream: Upstream, route: Route, body: dict[str, Any], *, model: str, timeout: float | None
    ) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        async with upstream.stream_lines(
            self.name,
            route.base_url,
            "/v1/messages",
            _request(route, body, stream=True),
            headers=_headers(route),
            timeout=timeout,
        ) as lines:
            yield translated_chunks(
                lines,
                translate.AnthropicStreamTranslator(model, int(time.time())),
                include_usage=include_usage,
            )
