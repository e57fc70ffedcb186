"""The router's lean HTTP/1.1 client against real sockets: framing, encodings, keep-alive, broken
servers, timeouts, TLS, and ``Upstream.post_json`` on top of it."""

from __future__ import annotations

import asyncio
import datetime
import gzip
import ssl
import zlib
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from services.router.http1 import ConnectionClosed, Http1Client, ProtocolError
from services.router.upstream import RetryPolicy, Upstream, UpstreamError

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Server:
    """A real TCP server whose every connection runs ``handler``; counts connections and keeps
    each request's head and body."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[tuple[bytes, bytes]] = []
        self.port = 0

    async def read_request(self, reader: asyncio.StreamReader) -> tuple[bytes, bytes] | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
        body = await reader.readexactly(length)
        self.requests.append((head, body))
        return head, body

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer)
        finally:
            writer.close()


@asynccontextmanager
async def serving(handler_for: Callable[[Server], Handler], ssl_context: ssl.SSLContext | None = None):
    server = Server(lambda r, w: asyncio.sleep(0))
    server.handler = handler_for(server)
    listener = await asyncio.start_server(server._serve, "127.0.0.1", 0, ssl=ssl_context)
    server.port = listener.sockets[0].getsockname()[1]
    try:
        yield server
    finally:
        listener.close()


def answer(body: bytes, *, status: str = "200 OK", headers: str = "") -> bytes:
    return (
        f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n{headers}\r\n"
    ).encode() + body


def keep_answering(reply: Callable[[bytes], bytes]) -> Callable[[Server], Handler]:
    def handler_for(server: Server) -> Handler:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while (request := await server.read_request(reader)) is not None:
                writer.write(reply(request[1]))
                await writer.drain()

        return handle

    return handler_for


def once_then(action: Callable[[asyncio.StreamWriter], Awaitable[None]]) -> Callable[[Server], Handler]:
    """Reads one request, then does ``action`` (and the connection closes)."""

    def handler_for(server: Server) -> Handler:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if await server.read_request(reader) is not None:
                await action(writer)

        return handle

    return handler_for


async def test_posts_reuse_one_connection_and_send_the_request_as_given() -> None:
    async with serving(keep_answering(lambda body: answer(b'{"echo": ' + body + b"}"))) as server:
        client = Http1Client()
        url = f"http://127.0.0.1:{server.port}/v1/chat/completions?api-version=1"
        for n in range(3):
            reply = await client.post(url, b'{"n": %d}' % n, {"authorization": "Bearer k"}, timeout=5)
            assert (reply.status, reply.body) == (200, b'{"echo": {"n": %d}}' % n)
            assert reply.headers["content-type"] == "application/json"
        await client.close()
    assert server.connections == 1
    head, body = server.requests[2]
    assert head.startswith(b"POST /v1/chat/completions?api-version=1 HTTP/1.1\r\n")
    assert f"host: 127.0.0.1:{server.port}\r\n".encode() in head
    assert b"authorization: Bearer k\r\n" in head and b"content-length: 8\r\n" in head
    assert body == b'{"n": 2}'


async def test_chunked_gzip_and_deflate_bodies_arrive_whole_and_decoded() -> None:
    payload = b'{"text": "' + b"x" * 5000 + b'"}'

    def chunked(_: bytes) -> bytes:
        chunks = [payload[i : i + 700] for i in range(0, len(payload), 700)]
        framed = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
        return b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + framed

    encodings = {
        "gzip": gzip.compress(payload),
        "deflate": zlib.compress(payload),
    }
    client = Http1Client()
    async with serving(keep_answering(chunked)) as server:
        reply = await client.post(f"http://127.0.0.1:{server.port}/", b"{}", {}, timeout=5)
        assert reply.body == payload
    for name, encoded in encodings.items():
        async with serving(
            keep_answering(lambda _, e=encoded, n=name: answer(e, headers=f"content-encoding: {n}\r\n"))
        ) as server:
            reply = await client.post(f"http://127.0.0.1:{server.port}/", b"{}", {}, timeout=5)
            assert reply.body == payload, name
    await client.close()


async def test_a_body_that_ends_with_the_connection_is_whole_and_the_connection_not_kept() -> None:
    async def unframed(writer: asyncio.StreamWriter) -> None:
        writer.write(b'HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n{"a": ')
        await writer.drain()
        writer.write(b"1}")

    async with serving(once_then(unframed)) as server:
        client = Http1Client()
        url = f"http://127.0.0.1:{server.port}/"
        assert (await client.post(url, b"{}", {}, timeout=5)).body == b'{"a": 1}'
        assert (await client.post(url, b"{}", {}, timeout=5)).body == b'{"a": 1}'
        await client.close()
    assert server.connections == 2


async def test_an_idle_connection_the_server_closed_is_replaced_without_an_error() -> None:
    async def answer_then_close(writer: asyncio.StreamWriter) -> None:
        writer.write(answer(b"{}"))  # keep-alive by HTTP/1.1's default, then closed anyway
        await writer.drain()

    async with serving(once_then(answer_then_close)) as server:
        client = Http1Client()
        url = f"http://127.0.0.1:{server.port}/"
        for _ in range(3):
            assert (await client.post(url, b"{}", {}, timeout=5)).status == 200
            await asyncio.sleep(0.05)  # the close reaches the client while the connection is idle
        await client.close()
    assert server.connections == 3


async def test_a_reused_connection_closed_before_any_answer_is_retried_once_on_a_new_one() -> None:
    def handler_for(server: Server) -> Handler:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            first_connection = server.connections == 1
            answered = 0
            while await server.read_request(reader) is not None:
                if first_connection and answered == 1:
                    return  # reads the second request, then closes without a byte of answer
                writer.write(answer(b"{}"))
                await writer.drain()
                answered += 1

        return handle

    async with serving(handler_for) as server:
        client = Http1Client()
        url = f"http://127.0.0.1:{server.port}/"
        assert (await client.post(url, b"{}", {}, timeout=5)).status == 200
        assert (await client.post(url, b"{}", {}, timeout=5)).status == 200
        await client.close()
    assert server.connections == 2 and len(server.requests) == 3


async def test_broken_answers_are_clear_errors_and_their_connections_dropped() -> None:
    async def cut_mid_body(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{")

    async def garbage(writer: asyncio.StreamWriter) -> None:
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")

    async def bad_gzip(writer: asyncio.StreamWriter) -> None:
        writer.write(answer(b"not gzip", headers="content-encoding: gzip\r\n"))

    client = Http1Client()
    for action, error in (
        (cut_mid_body, ConnectionClosed),
        (garbage, ProtocolError),
        (bad_gzip, ProtocolError),
    ):
        async with serving(once_then(action)) as server:
            with pytest.raises(error):
                await client.post(f"http://127.0.0.1:{server.port}/", b"{}", {}, timeout=5)
    await client.close()


async def test_a_silent_server_times_out_and_the_next_call_gets_a_new_connection() -> None:
    calls = 0

    def handler_for(server: Server) -> Handler:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal calls
            while await server.read_request(reader) is not None:
                calls += 1
                if calls == 1:
                    continue  # never answers the first call
                writer.write(answer(b"{}"))
                await writer.drain()

        return handle

    async with serving(handler_for) as server:
        client = Http1Client()
        url = f"http://127.0.0.1:{server.port}/"
        with pytest.raises(TimeoutError):
            await client.post(url, b"{}", {}, timeout=0.2)
        assert (await client.post(url, b"{}", {}, timeout=5)).status == 200
        await client.close()
    assert server.connections == 2


async def test_refused_connections_and_bad_headers_or_urls_raise_before_anything_is_sent() -> None:
    async with serving(keep_answering(lambda _: answer(b"{}"))) as server:
        port = server.port
    client = Http1Client()
    with pytest.raises(ConnectionRefusedError):
        await client.post(f"http://127.0.0.1:{port}/", b"{}", {}, timeout=5)
    with pytest.raises(ValueError, match="line break"):
        await client.post(f"http://127.0.0.1:{port}/", b"{}", {"x-key": "a\r\nx-evil: 1"}, timeout=5)
    with pytest.raises(ValueError, match="not an http"):
        await client.post("ftp://127.0.0.1/", b"{}", {}, timeout=5)


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


async def test_https_verifies_the_server_certificate(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    async with serving(keep_answering(lambda _: answer(b'{"ok": true}')), server_tls) as server:
        url = f"https://localhost:{server.port}/v1"
        with pytest.raises(ssl.SSLCertVerificationError):
            await Http1Client().post(url, b"{}", {}, timeout=5)  # the system's trust store
        trusting = Http1Client(ssl_context=ssl.create_default_context(cafile=str(cert)))
        for _ in range(2):
            assert (await trusting.post(url, b"{}", {}, timeout=5)).body == b'{"ok": true}'
        await trusting.close()
    assert server.connections == 1  # both calls on one connection (the refused handshake never got one)


async def test_post_json_retries_broken_answers_then_gives_a_clear_502() -> None:
    async def garbage(writer: asyncio.StreamWriter) -> None:
        writer.write(b"NOT HTTP\r\n\r\n")

    upstream = Upstream(timeout=5, retry=RetryPolicy(max_retries=1, base_delay=0.01))
    async with serving(once_then(garbage)) as server:
        with pytest.raises(UpstreamError) as caught:
            await upstream.post_json("openai", f"http://127.0.0.1:{server.port}/v1", "/x", {}, headers={})
    assert (caught.value.status_code, caught.value.code) == (502, "upstream_unreachable")
    assert server.connections == 2  # tried twice
    with pytest.raises(UpstreamError) as caught:
        await upstream.post_json("openai", "http://127.0.0.1:1/v1", "/x", {}, headers={"k": "a\nb"})
    assert caught.value.status_code == 400 and "line break" in caught.value.message
    await upstream.close()


class LimitedOnce:
    """Answers the first call with a 429 and ``Retry-After: 0``, every later one with ``then``."""

    def __init__(self, then: bytes) -> None:
        self.then = then
        self.calls = 0

    def __call__(self, _: bytes) -> bytes:
        self.calls += 1
        if self.calls == 1:
            return answer(
                b'{"error": {"message": "slow down"}}', status="429 Too Many", headers="Retry-After: 0\r\n"
            )
        return self.then


def upstream_that_cannot_back_off() -> Upstream:
    """A backoff of 30 s would time a test out: only an honoured ``Retry-After: 0`` answers at once."""
    return Upstream(timeout=5, retry=RetryPolicy(max_retries=1, base_delay=30))


async def test_post_json_reads_retry_after_from_an_error_answer() -> None:
    reply = LimitedOnce(answer(b'{"choices": []}'))
    upstream = upstream_that_cannot_back_off()
    async with serving(keep_answering(reply)) as server:
        result = await asyncio.wait_for(
            upstream.post_json("openai", f"http://127.0.0.1:{server.port}", "/x", {}, headers={}), 5
        )
    assert result == {"choices": []} and reply.calls == 2
    await upstream.close()


async def test_a_stream_reads_retry_after_from_an_error_answer_too() -> None:
    events = b"data: 1\n\ndata: [DONE]\n\n"
    reply = LimitedOnce(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(events), events))
    upstream = upstream_that_cannot_back_off()

    async def read_stream(port: int) -> list[str]:
        async with upstream.stream_lines("openai", f"http://127.0.0.1:{port}", "/x", {}, headers={}) as lines:
            return [line async for line in lines]

    async with serving(keep_answering(reply)) as server:
        assert await asyncio.wait_for(read_stream(server.port), 5) == ["data: 1", "", "data: [DONE]", ""]
    assert reply.calls == 2
    await upstream.close()
