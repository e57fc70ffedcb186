"""A lean HTTP/1.1 client for the router's JSON calls to providers (streamed answers use aiohttp).

aiohttp's client spends ~170 µs of event-loop CPU on a request (URL objects, the cookie jar,
tracing signals, header multidicts, timer handles); this one ~55 µs, over keep-alive connections
parsed by ``httptools`` (uvicorn's parser). On the judge's path that was a quarter of the loop's
time per verdict (bench/judge.py). What it does: keep-alive connections per origin (a reused
connection the server closed meanwhile is replaced once, before anything was answered), bodies
framed by length, chunked or by the end of the connection, gzip and deflate, TLS with the
system's trust store. What it does not do: redirects, proxies, cookies.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools

DEFAULT_PORTS = {"http": 80, "https": 443}


class ConnectionClosed(ConnectionError):
    """The server closed the connection before its answer was complete."""


class ProtocolError(ConnectionError):
    """The server's answer was not valid HTTP/1.1."""


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]  # names in lower case
    body: bytes


@dataclass(frozen=True)
class Origin:
    scheme: str
    host: str
    port: int
    host_header: str


@functools.lru_cache(maxsize=1024)
def split_url(url: str) -> tuple[Origin, str]:
    """The origin and the request target (path and query) of an ``http(s)://`` URL."""
    parts = urlsplit(url)
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    host_header = parts.netloc.rpartition("@")[2]
    origin = Origin(parts.scheme, parts.hostname, parts.port or DEFAULT_PORTS[parts.scheme], host_header)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return origin, target


def request_head(origin: Origin, target: str, headers: Mapping[str, str], length: int) -> bytes:
    lines = [
        f"POST {target} HTTP/1.1",
        f"host: {origin.host_header}",
        f"content-length: {length}",
        "accept-encoding: gzip, deflate",
    ]
    for name, value in headers.items():
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name or ":" in name:
            raise ValueError(f"header {name!r} has a line break or a colon in its name")
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def decoded(body: bytes, encoding: str) -> bytes:
    try:
        if encoding == "gzip":
            return zlib.decompress(body, 16 + zlib.MAX_WBITS)
        if encoding == "deflate":
            try:
                return zlib.decompress(body)
            except zlib.error:
                return zlib.decompress(body, -zlib.MAX_WBITS)  # raw deflate, as some servers send
    except zlib.error as exc:
        raise ProtocolError(f"a {encoding} body that does not decompress: {exc}") from None
    if encoding in ("", "identity"):
        return body
    raise ProtocolError(f"a body in an encoding that was not asked for: {encoding}")


class Connection(asyncio.Protocol):
    """One keep-alive connection; one request at a time."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reusable = False
        self.idle_since = 0.0
        self._answer: asyncio.Future[Reply] | None = None
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._headers_done = False
        self.received = False  # any byte of the current answer

    async def exchange(self, request: bytes) -> Reply:
        assert self.transport is not None
        self._headers, self._body, self._headers_done, self.received = {}, [], False, False
        self.reusable = False
        self._answer = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return await self._answer

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._settle(error=ProtocolError(f"an invalid HTTP answer ({exc})"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        framed = "content-length" in self._headers or "chunked" in self._headers.get("transfer-encoding", "")
        if self._headers_done and not framed:
            self._complete()  # the body ends with the connection
        else:
            self._settle(
                error=ConnectionClosed("the server closed the connection before its answer was complete")
            )

    # httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        self._headers[key] = f"{self._headers[key]}, {text}" if key in self._headers else text

    def on_headers_complete(self) -> None:
        self._headers_done = True

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        self.reusable = self.parser.should_keep_alive()
        self._complete()

    def _complete(self) -> None:
        try:
            body = decoded(b"".join(self._body), self._headers.get("content-encoding", "").strip().lower())
        except ProtocolError as exc:
            self.reusable = False
            self._settle(error=exc)
            return
        self._settle(reply=Reply(self.parser.get_status_code(), self._headers, body))

    def _settle(self, *, reply: Reply | None = None, error: Exception | None = None) -> None:
        answer, self._answer = self._answer, None
        if answer is None or answer.done():
            return
        if error is not None:
            answer.set_exception(error)
        else:
            answer.set_result(reply)  # type: ignore[arg-type]


class Http1Client:
    """Keep-alive connections per origin, for POSTs whose whole answer is read at once."""

    def __init__(
        self,
        *,
        keepalive_seconds: float = 60.0,
        max_idle_per_origin: int = 1000,
        connect_timeout: float = 10.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.keepalive_seconds = keepalive_seconds
        self.max_idle_per_origin = max_idle_per_origin
        self.connect_timeout = connect_timeout
        self._ssl_context = ssl_context
        self._idle: dict[Origin, list[Connection]] = {}
        self._open: set[Connection] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def post(self, url: str, body: bytes, headers: Mapping[str, str], *, timeout: float) -> Reply:
        """The answer to one POST, within ``timeout`` seconds (connecting included). Raises
        ``TimeoutError``, ``ConnectionError`` (refused, reset, closed early, invalid HTTP) or
        another ``OSError`` (a name that does not resolve, TLS); ``ValueError`` for a bad header."""
        origin, target = split_url(url)
        request = request_head(origin, target, headers, len(body)) + body
        async with asyncio.timeout(timeout):
            connection = self._take_idle(origin)
            if connection is not None:
                try:
                    return await self._exchange(origin, connection, request)
                except ConnectionClosed:
                    if connection.received:
                        raise
                    # The server closed the idle connection as the request went out: nothing was
                    # answered, so the request goes once more on a new connection.
            connection = await self._connect(origin)
            return await self._exchange(origin, connection, request)

    async def close(self) -> None:
        for connection in list(self._open):
            connection.close()
        self._open.clear()
        self._idle.clear()

    def _take_idle(self, origin: Origin) -> Connection | None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # connections belong to the loop that opened them
            self._idle.clear()
            self._open.clear()
            self._loop = loop
        idle = self._idle.get(origin)
        stale_before = time.monotonic() - self.keepalive_seconds
        while idle:
            connection = idle.pop()
            if not connection.closed and connection.idle_since > stale_before:
                return connection
            self._discard(connection)
        return None

    async def _connect(self, origin: Origin) -> Connection:
        loop = asyncio.get_running_loop()
        tls = self._tls() if origin.scheme == "https" else None
        async with asyncio.timeout(self.connect_timeout):
            _, connection = await loop.create_connection(
                Connection, origin.host, origin.port, ssl=tls, server_hostname=origin.host if tls else None
            )
        self._open.add(connection)
        return connection

    async def _exchange(self, origin: Origin, connection: Connection, request: bytes) -> Reply:
        try:
            reply = await connection.exchange(request)
        except BaseException:  # cancelled, timed out or broken mid-answer: its state is unknown
            self._discard(connection)
            raise
        idle = self._idle.setdefault(origin, [])
        if connection.reusable and not connection.closed and len(idle) < self.max_idle_per_origin:
            connection.idle_since = time.monotonic()
            idle.append(connection)
        else:
            self._discard(connection)
        return reply

    def _discard(self, connection: Connection) -> None:
        connection.close()
        self._open.discard(connection)

    def _tls(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()
        return self._ssl_context
