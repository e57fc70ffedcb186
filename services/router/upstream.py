"""Calling upstream providers: one pooled HTTP client per base URL, retries, timeouts, clear errors."""

from __future__ import annotations

import asyncio
import email.utils
import itertools
import logging
import random
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from services.common import metrics
from services.common.errors import APIError
from services.router.http1 import Http1Client

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

    def delay(self, attempt: int, failed: Failed | None) -> float | None:
        """Seconds to wait before retry ``attempt`` (1-based), or None when the wait is too long."""
        retry_after = _retry_after_seconds(failed.headers) if failed is not None else None
        if retry_after is not None:
            return retry_after if retry_after <= self.max_retry_after else None
        backoff = min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
        return backoff * (0.5 + random.random() / 2)


@dataclass(frozen=True)
class Failed:
    """An upstream's error answer, read whole."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")


def _retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    value = headers.get("retry-after-ms")
    if value and value.replace(".", "", 1).isdigit():
        return float(value) / 1000
    value = headers.get("retry-after")
    if not value:
        return None
    if value.replace(".", "", 1).isdigit():
        return float(value)
    parsed = email.utils.parsedate_to_datetime(value)
    return max(0.0, parsed.timestamp() - time.time()) if parsed else None


def _upstream_message(failed: Failed) -> tuple[str, str | None, str | None]:
    """Message, type and code from an upstream error body (OpenAI, Anthropic or Gemini shape)."""
    try:
        body = orjson.loads(failed.body)
    except orjson.JSONDecodeError:
        return failed.text[:500] or f"HTTP {failed.status}", None, None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        code = error.get("code")
        return (
            str(error.get("message") or f"HTTP {failed.status}"),
            error.get("type") or error.get("status"),
            str(code) if code is not None else None,
        )
    return failed.text[:500], None, None


def error_from_response(provider: str, failed: Failed) -> UpstreamError:
    message, kind, code = _upstream_message(failed)
    status = failed.status
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
    """Every provider call goes through here: whole JSON answers on the lean ``http1`` client,
    streamed ones on pooled aiohttp sessions keyed by base URL.

    aiohttp rather than httpx for streams: httpx's pool does work per idle connection on every
    request (quadratic under load), which bench/router.py measured as most of the router's CPU.
    """

    def __init__(self, *, timeout: float, retry: RetryPolicy) -> None:
        self.timeout = timeout
        self.retry = retry
        self._sessions: dict[str, aiohttp.ClientSession] = {}
        self.http = Http1Client()

    def session(self, base_url: str) -> aiohttp.ClientSession:
        session = self._sessions.get(base_url)
        if session is None:
            connector = aiohttp.TCPConnector(
                limit=1000, limit_per_host=0, keepalive_timeout=60, ttl_dns_cache=300
            )
            session = aiohttp.ClientSession(connector=connector, auto_decompress=True)
            self._sessions[base_url] = session
        return session

    async def close(self) -> None:
        await asyncio.gather(*(s.close() for s in self._sessions.values()), return_exceptions=True)
        self._sessions.clear()
        await self.http.close()

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
        """POST with retries on 429/5xx and connection errors; returns the parsed JSON body.

        On the lean client (``http1``): a caller's deadline bounds the whole call, otherwise each
        attempt may take up to the upstream timeout (the answer comes whole, so that is its read)."""
        url, content, request_headers = _request(base_url, path, body, headers)
        for attempt in _attempts(provider):
            sent = time.perf_counter()
            try:
                reply = await self.http.post(url, content, request_headers, timeout=timeout or self.timeout)
            except OSError as exc:  # TimeoutError included
                await self._wait_to_retry(provider, attempt, timeout, exc)
                continue
            except ValueError as exc:
                raise UpstreamError(
                    400, f"{provider}: cannot send the request: {exc}", type="invalid_request_error"
                ) from None
            metrics.observe_upstream(provider, reply.status, time.perf_counter() - sent)
            if reply.status < 400:
                try:
                    return orjson.loads(reply.body)
                except orjson.JSONDecodeError:
                    raise UpstreamError(502, f"{provider} returned a body that is not JSON") from None
            failed = Failed(reply.status, reply.headers, reply.body)
            await self._wait_to_retry_failed(provider, attempt, failed)

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
        async with self._send(provider, base_url, path, body, headers=headers, timeout=timeout) as response:
            yield _lines(response, provider)

    def _timeout(self, timeout: float | None) -> aiohttp.ClientTimeout:
        # A caller's deadline (fallback) bounds the whole call; otherwise each read may take
        # up to the upstream timeout, so long streamed answers are not cut off.
        if timeout is not None:
            return aiohttp.ClientTimeout(total=timeout, connect=10)
        return aiohttp.ClientTimeout(total=None, connect=10, sock_read=self.timeout)

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
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        session = self.session(base_url)
        url, content, request_headers = _request(base_url, path, body, headers)
        for attempt in _attempts(provider):
            sent = time.perf_counter()
            try:
                response = await session.post(
                    url, data=content, headers=request_headers, timeout=self._timeout(timeout)
                )
            except (TimeoutError, aiohttp.ClientError) as exc:
                await self._wait_to_retry(provider, attempt, timeout, exc)
                continue
            metrics.observe_upstream(provider, response.status, time.perf_counter() - sent)
            if response.status < 400:
                break
            answer_headers = {name.lower(): value for name, value in response.headers.items()}
            failed = Failed(response.status, answer_headers, await response.read())
            response.release()
            await self._wait_to_retry_failed(provider, attempt, failed)
        try:
            yield response
        finally:
            response.release()

    async def _wait_to_retry(
        self, provider: str, attempt: int, timeout: float | None, exc: Exception
    ) -> None:
        """After a call that got no answer: wait before the next attempt, or raise its clear error.
        A caller's deadline (``timeout``) that passed is not retried: it was the whole budget."""
        if isinstance(exc, TimeoutError):
            if attempt <= self.retry.max_retries and timeout is None:
                await asyncio.sleep(self.retry.delay(attempt, None) or 0)
                return
            raise UpstreamError(504, f"{provider} did not answer in time", code="upstream_timeout") from None
        if attempt <= self.retry.max_retries:
            await asyncio.sleep(self.retry.delay(attempt, None) or 0)
            return
        raise UpstreamError(
            502, f"cannot reach {provider}: {type(exc).__name__}", code="upstream_unreachable"
        ) from None

    async def _wait_to_retry_failed(self, provider: str, attempt: int, failed: Failed) -> None:
        """After an error answer: wait before the next attempt (429/5xx), or raise its clear error."""
        if failed.status in RETRY_STATUSES and attempt <= self.retry.max_retries:
            delay = self.retry.delay(attempt, failed)
            if delay is not None:
                log.info("%s answered %d; retry %d in %.2fs", provider, failed.status, attempt, delay)
                await asyncio.sleep(delay)
                return
        if failed.status == 429:
            raise UpstreamError(
                429,
                f"{provider} rate limit: {_upstream_message(failed)[0]}",
                type="rate_limit_error",
                code="rate_limit_exceeded",
            )
        raise error_from_response(provider, failed)


def _request(
    base_url: str, path: str, body: dict[str, Any], headers: dict[str, str]
) -> tuple[str, bytes, dict[str, str]]:
    return base_url.rstrip("/") + path, orjson.dumps(body), {"content-type": "application/json", **headers}


def _attempts(provider: str) -> Iterator[int]:
    """1, 2, 3, ... (the caller stops), each retry counted in the metrics."""
    for attempt in itertools.count(1):
        if attempt > 1:
            metrics.ROUTER_RETRIES.labels(provider).inc()
        yield attempt


async def _lines(response: aiohttp.ClientResponse, provider: str) -> AsyncIterator[str]:
    """The body's lines without their endings, however the bytes are chunked (no line-size cap)."""
    pending = b""
    try:
        async for chunk in response.content.iter_any():
            pending += chunk
            *complete, pending = pending.split(b"\n")
            for line in complete:
                yield line.rstrip(b"\r").decode()
    except TimeoutError:
        raise UpstreamError(504, f"{provider} stopped sending mid-stream", code="upstream_timeout") from None
    except aiohttp.ClientError as exc:
        raise UpstreamError(
            502, f"{provider} broke the stream: {type(exc).__name__}", code="upstream_error"
        ) from None
    if pending:
        yield pending.rstrip(b"\r").decode()
