"""Google Gemini (``generateContent``) behind the OpenAI chat interface (``gemini:<model>``)."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from services.common.errors import bad_request
from services.router.providers import gemini_translate as translate
from services.router.providers.base import translated_chunks
from services.router.routing import Route
from services.router.upstream import Upstream


def _request(body: dict[str, Any]) -> dict[str, Any]:
    try:
        return translate.to_gemini_request(body)
    except translate.TranslationError as exc:
        raise bad_request(f"gemini: {exc.message}", param=exc.param) from None


def _headers(route: Route) -> dict[str, str]:
    return {"x-goog-api-key": route.api_key or ""}


def _completion_id() -> str:
    return f"chatcmpl-{secrets.token_hex(12)}"


class GeminiProvider:
    name = "gemini"

    async def complete(
        self, upstream: Upstream, route: Route, body: dict[str, Any], *, model: str, timeout: float | None
    ) -> dict[str, Any]:
        path = f"/v1beta/models/{route.upstream_model}:generateContent"
        response = await upstream.post_json(
            self.name, route.base_url, path, _request(body), headers=_headers(route), timeout=timeout
        )
        return translate.from_gemini_response(
            response, model=model, created=int(time.time()), completion_id=_completion_id()
        )

    @asynccontextmanager
    async def stream(
        self, upstream: Upstream, route: Route, body: dict[str, Any], *, model: str, timeout: float | None
    ) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        path = f"/v1beta/models/{route.upstream_model}:streamGenerateContent?alt=sse"
        async with upstream.stream_lines(
            self.name, route.base_url, path, _request(body), headers=_headers(route), timeout=timeout
        ) as lines:
            yield translated_chunks(
                lines,
                translate.GeminiStreamTranslator(model, int(time.time()), _completion_id()),
                include_usage=include_usage,
            )
