"""One socket write per response (services/common/http.py CoalescedWrites) under a real uvicorn."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import uvicorn
from starlette.types import Receive, Scope, Send

from services.common.http import COALESCE_LIMIT, CoalescedWrites, CoalescingHttpToolsProtocol
from services.common.kafka import free_port

BIG = b"x" * (3 * COALESCE_LIMIT + 17)


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    headers = [(b"content-type", b"text/plain")]
    if scope["path"] == "/stream":  # chunked, with pauses between chunks
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for i in range(3):
            await send({"type": "http.response.body", "body": f"chunk{i};".encode(), "more_body": True})
            await asyncio.sleep(0.05)
        await send({"type": "http.response.body", "body": b"end"})
        return
    body = BIG if scope["path"] == "/big" else b"small"
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [*headers, (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


@asynccontextmanager
async def coalescing_server() -> AsyncIterator[int]:
    """uvicorn over ``CoalescingHttpToolsProtocol`` on a free port, as ``distillery up`` runs it."""
    port = free_port()
    config = uvicorn.Config(
        app, port=port, http=CoalescingHttpToolsProtocol, log_level="warning", lifespan="off"
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    for _ in range(500):
        if server.started:
            break
        await asyncio.sleep(0.01)
    try:
        yield port
    finally:
        server.should_exit = True
        await serving


async def test_responses_small_big_streamed_and_kept_alive_arrive_whole() -> None:
    async with coalescing_server() as port, httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        for _ in range(20):  # one kept-alive connection, one response after another
            assert (await client.get("/small")).content == b"small"
        assert (await client.get("/big")).content == BIG
        async with client.stream("GET", "/stream") as response:
            chunks = [chunk async for chunk in response.aiter_raw()]
        assert b"".join(chunks) == b"chunk0;chunk1;chunk2;end"
        assert len(chunks) >= 3  # the pauses' chunks were not held back until the end


class RecordingTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


async def test_writes_join_until_the_loop_turns_and_close_sends_what_is_pending() -> None:
    transport = RecordingTransport()
    writes = CoalescedWrites(transport, asyncio.get_running_loop())  # type: ignore[arg-type]
    writes.write(b"head,")
    writes.write(b"body")
    assert transport.writes == []
    await asyncio.sleep(0)
    assert transport.writes == [b"head,body"]
    writes.write(b"last")
    writes.close()
    assert transport.writes == [b"head,body", b"last"] and transport.closed
    await asyncio.sleep(0)  # the scheduled flush finds nothing left
    assert transport.writes == [b"head,body", b"last"]
