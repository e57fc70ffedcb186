"""What every provider adapter offers the router: one completion, or a stream of chunks."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

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
