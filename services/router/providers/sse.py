"""Server-sent events from upstream providers, parsed incrementally (Anthropic and Gemini streams)."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from typing import Any

import orjson

from services.router.providers.translation import UpstreamStreamError

DONE_EVENT = "[DONE]"


class SSEParser:
    """Incremental server-sent-events parser fed one line at a time (``httpx`` ``aiter_lines()``).

    :meth:`feed_line` returns ``(event, data)`` when a blank line completes an event, else None.
    ``event`` is the ``event:`` field, else the JSON ``type`` field, else ``"message"``; ``data`` is
    the parsed JSON object. OpenAI's ``data: [DONE]`` sentinel comes out as ``(DONE_EVENT, {})``.
    Call :meth:`flush` at end of input for a final event without its trailing blank line.
    """

    def __init__(self) -> None:
        self._event: str | None = None
        self._data: list[str] = []

    def feed_line(self, line: str) -> tuple[str, dict[str, Any]] | None:
        line = line.rstrip("\r\n")
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if field == "event":
            self._event = value
        elif field == "data":
            self._data.append(value)
        return None

    def flush(self) -> tuple[str, dict[str, Any]] | None:
        return self._dispatch()

    def _dispatch(self) -> tuple[str, dict[str, Any]] | None:
        event, lines = self._event, self._data
        self._event, self._data = None, []
        if not lines:
            return None
        text = "\n".join(lines)
        if text.strip() == DONE_EVENT:
            return DONE_EVENT, {}
        try:
            data = orjson.loads(text)
        except orjson.JSONDecodeError:
            raise UpstreamStreamError(f"malformed event from upstream: {text[:200]!r}") from None
        if isinstance(data, list) and len(data) == 1 and isinstance(data[0], dict):
            data = data[0]  # Gemini wraps some errors in a one-element array
        if not isinstance(data, dict):
            raise UpstreamStreamError(f"unexpected event from upstream: {text[:200]!r}")
        if event is None:
            event = data["type"] if isinstance(data.get("type"), str) else "message"
        return event, data


def parse_sse_lines(lines: Iterable[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(event, data)`` for every event in an iterable of text lines."""
    parser = SSEParser()
    for line in lines:
        if (item := parser.feed_line(line)) is not None:
            yield item
    if (item := parser.flush()) is not None:
        yield item


async def aparse_sse_lines(lines: AsyncIterable[str]) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """:func:`parse_sse_lines` over an async iterable (``response.aiter_lines()``)."""
    parser = SSEParser()
    async for line in lines:
        if (item := parser.feed_line(line)) is not None:
            yield item
    if (item := parser.flush()) is not None:
        yield item
