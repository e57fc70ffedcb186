"""OpenAI and every OpenAI-compatible server (external providers, vLLM deployments, Azure)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson

from services.router.routing import Route
from services.router.upstream import Upstream, UpstreamError


def _target(route: Route) -> tuple[str, dict[str, str], dict[str, Any]]:
    """Path, auth headers and body overrides for this route."""
    if route.provider == "azure":
        path = f"/openai/deployments/{route.upstream_model}/chat/completions?api-version={route.api_version}"
        return path, {"api-key": route.api_key or ""}, {}
    headers = {"authorization": f"Bearer {route.api_key}"} if route.api_key else {}
    return "/chat/completions", headers, {"model": route.upstream_model}


class OpenAIProvider:
    name = "openai"

    async def complete(
        self, upstream: Upstream, route: Route, body: dict[str, Any], *, model: str, timeout: float | None
    ) -> dict[str, Any]:
        path, headers, overrides = _target(route)
        result = await upstream.post_json(
            self.name,
            route.base_url,
            path,
            {**body, **overrides, "stream": False},
            headers=headers,
            timeout=timeout,
        )
        if not isinstance(result, dict) or not isinstance(result.get("choices"), list):
            raise UpstreamError(502, f"{self.name} returned a response without choices")
        result["model"] = model
        return result

    @asynccontextmanager
    async def stream(
        self, upstream: Upstream, route: Route, body: dict[str, Any], *, model: str, timeout: float | None
    ) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
        path, headers, overrides = _target(route)
        async with upstream.stream_lines(
            self.name,
            route.base_url,
            path,
            {**body, **overrides, "stream": True},
            headers=headers,
            timeout=timeout,
        ) as lines:
            yield _chunks(lines, model)


async def _chunks(lines: AsyncIterator[str], model: str) -> AsyncIterator[dict[str, Any]]:
    async for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        chunk = orjson.loads(data)
        if isinstance(chunk, dict) and "error" in chunk and "choices" not in chunk:
            message = (chunk["error"] or {}).get("message", "stream error")
            raise UpstreamError(502, f"openai stream error: {message}")
        chunk["model"] = model
        yield chunk
