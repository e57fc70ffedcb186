"""Calling upstream providers: one pooled HTTP client per base URL, retries, timeouts, clear errors."""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from services.common.errors import APIError

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504, 529})


class UpstreamError(APIError):
    """An upstream provider failed; carries its status and (sanitized) message."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        type: str = "upstream_error",
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(status_code, message, type=type, code=code, param=param)


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 2
    base_delay: float = 0.25
    max_delay: float = 8.0
    max_retry_after: float = 20.0

    def delay(self, attempt: int, response: httpx.Response | None) -> float | None:
        """Seconds to wait before retry ``attempt`` (1-based), or None when the wait is too long."""
        retry_after = _retry_after_seconds(response) if response is not None else None
        if retry_after is not None:
            return retry_after if retry_after <= self.max_retry_after else None
        backoff = min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
        return backoff * (0.5 + random.random() / 2)


def _retry_after_seconds(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after-ms")
    if value and value.replace(".", "", 1).isdigit():
        return float(value) / 1000
    value = response.headers.get("retry-after")
    if not value:
        return None
    if value.replace(".", "", 1).isdigit():
        return float(value)
    parsed = email.utils.parsedate_to_datetime(value)
    return max(0.0, parsed.timestamp() - time.time()) if parsed else None


def _upstream_message(response: httpx.Response) -> tuple[str, str | None, str | None]:
    """Message, type and code from an upstream error body (OpenAI, Anthropic or Gemini shape)."""
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return response.text[:500] or response.reason_phrase, None, None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        code = error.get("code")
        return (
            str(error.get("message") or response.reason_phrase),
            error.get("type") or error.get("status"),
            str(code) if code is not None else None,
        )
    return response.text[:500], None, None


def error_from_response(provider: str, response: httpx.Response) -> UpstreamError:
    message, kind, code = _upstream_message(response)
    status = response.status_code
    # The client did something the provider refused: pass the status through. Our own
    # gateway failure (5xx after retries) is a 502 so it is not mistaken for ours.
    if status >= 500:
        return UpstreamError(
            502, f"{provider} upstream error ({status}): {message}", code=code or "upstream_error"
        )
    if status in (401, 403):
        return UpstreamError(
            status,
            f"{provider} rejected the provider API key configured for this project: {message}",
            type="upstream_auth_error",
            code=code,
        )
    return UpstreamError(status, f"{provider}: {message}", type=kind or "invalid_request_error", code=code)


class Upstream:
    """Shared, pooled HTTP clients keyed by base URL; every provider call goes through here."""

    def __init__(
        self, *, timeout: float, retry: RetryPolicy, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        self.timeout = timeout
        self.retry = retry
        self._transport = transport
        self._clients: dict[str, httpx.AsyncClient] = {}

    def client(self, base_url: str) -> httpx.AsyncClient:
        client = self._clients.get(base_url)
        if client is None:
            limits = httpx.Limits(max_connections=1000, max_keepalive_connections=200, keepalive_expiry=60)
            client = httpx.AsyncClient(
                base_url=base_url,
                timeout=httpx.Timeout(self.timeout, connect=10),
                limits=limits,
                transport=self._transport,
            )
            self._clients[base_url] = client
        return client

    async def close(self) -> None:
        await asyncio.gather(*(c.aclose() for c in self._clients.values()), return_exceptions=True)
        self._clients.clear()

    async def post_json(
        self,
        provider: str,
        base_url: str,
        path: str,
        body: dict[str, Any],
        *,
        headers: dict[str, str],
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """POST with retries on 429/5xx and connection errors; returns the parsed JSON body."""
        async with self._send(
            provider, base_url, path, body, headers=headers, timeout=timeout, stream=False
        ) as response:
            try:
                return orjson.loads(response.content)
            except orjson.JSONDecodeError:
                raise UpstreamError(502, f"{provider} returned a body that is not JSON") from None

    @asynccontextmanager
    async def stream_lines(
        self,
        provider: str,
        base_url: str,
        path: str,
        body: dict[str, Any],
        *,
        headers: dict[str, str],
        timeout: float | None = None,
    ) -> AsyncIterator[AsyncIterator[str]]:
        """Open a streaming POST (retrying only before the first byte) and yield its lines."""
        async with self._send(
            provider, base_url, path, body, headers=headers, timeout=timeout, stream=True
        ) as response:
            yield response.aiter_lines()

    @asynccontextmanager
    async def _send(
        self,
        provider: str,
        base_url: str,
        path: str,
        body: dict[str, Any],
        *,
        headers: dict[str, str],
        timeout: float | None,
        stream: bool,
    ) -> AsyncIterator[httpx.Response]:
        client = self.client(base_url)
        content = orjson.dumps(body)
        request_headers = {"content-type": "application/json", **headers}
        attempt = 0
        while True:
            attempt += 1
            request = client.build_request(
                "POST", path, content=content, headers=request_headers, timeout=timeout or self.timeout
            )
            try:
                response = await client.send(request, stream=stream)
            except httpx.TimeoutException:
                if attempt <= self.retry.max_retries and timeout is None:
                    await asyncio.sleep(self.retry.delay(attempt, None) or 0)
                    continue
                raise UpstreamError(
                    504, f"{provider} did not answer in time", code="upstream_timeout"
                ) from None
            except httpx.TransportError as exc:
                if attempt <= self.retry.max_retries:
                    await asyncio.sleep(self.retry.delay(attempt, None) or 0)
                    continue
                raise UpstreamError(
                    502, f"cannot reach {provider}: {type(exc).__name__}", code="upstream_unreachable"
                ) from None
            if response.status_code < 400:
                break
            if stream:
                await response.aread()
            if response.status_code in RETRY_STATUSES and attempt <= self.retry.max_retries:
                delay = self.retry.delay(attempt, response)
                if delay is not None:
                    log.info(
                        "%s answered %d; retry %d in %.2fs", provider, response.status_code, attempt, delay
                    )
                    await response.aclose()
                    await asyncio.sleep(delay)
                    continue
            await response.aclose()
            if response.status_code == 429:
                raise UpstreamError(
                    429,
                    f"{provider} rate limit: {_upstream_message(response)[0]}",
                    type="rate_limit_error",
                    code="rate_limit_exceeded",
                )
            raise error_from_response(provider, response)
        try:
            yield response
        finally:
            await response.aclose()
