"""What every provider adapter offers the router: one completion, or a stream of chunks."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

from services.router.providers.sse import SSEParser
from services.router.routing import Route
from services.router.upstream import Upstream


class Provider(Protocol):
    name: str

    async def complete(
        self, upstream: Upstream, route: Route, body: dict[str, Any], *, model: str, timeout: float | None
    ) -> dict[str, Any]:
        """An OpenAI ``chat.completion`` dict whose ``model`` is the name the client asked for."""

    def stream(
        self, upstream: Upstream, route: Route, body: dict[str, Any], *, model: str, timeout: float | None
    ) -> AbstractAsyncContextManager[AsyncIterator[dict[str, Any]]]:
        """OpenAI ``chat.completion.chunk`` dicts; opening it raises if the upstream refuses."""


class StreamTranslator(Protocol):
    """Turns a provider's stream events into OpenAI chunks (Anthropic, Gemini)."""

    def feed(self, event: dict[str, Any]) -> list[dict[str, Any]]: ...

    def finish(self) -> list[dict[str, Any]]: ...

    def usage_chunk(self) -> dict[str, Any]: ...


async def translated_chunks(
    lines: AsyncIterator[str], translator: StreamTranslator, *, include_usage: bool
) -> AsyncIterator[dict[str, Any]]:
    """An upstream SSE stream as OpenAI chunks; the translator raises on error events or a cut stream."""
    parser = SSEParser()
    async for line in lines:
        parsed = parser.feed_line(line)
        if parsed is not None:
            for chunk in translator.feed(parsed[1]):
                yield chunk
    for chunk in translator.finish():
        yield chunk
    if include_usage:
        yield translator.usage_chunk()
