"""HTTP plumbing shared by every service."""

from __future__ import annotations

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common.errors import APIError, error_body

API_PREFIX = "/api/v1"
# Bodies refused by Content-Length are read and discarded up to this size before the 413;
# beyond it the connection is closed at once rather than spend bandwidth on them.
DRAIN_LIMIT = 64 * 1024 * 1024


async def _drain(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


def too_large(max_bytes: int) -> APIError:
    return APIError(
        413, f"Request body is larger than the limit of {max_bytes} bytes.", code="request_too_large"
    )


class BodySizeLimit:
    """Refuses bodies over ``max_bytes`` with a 413: up front by Content-Length, or while streaming."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            if int(declared) <= self.max_bytes + DRAIN_LIMIT:
                await _drain(receive)  # so the client, still sending, can read the 413
            await self._reject(send)
            return
        received = 0
        exceeded = False

        async def limited_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    exceeded = True
                    if message.get("more_body", False) and received <= self.max_bytes + DRAIN_LIMIT:
                        await _drain(receive)
                    return {"type": "http.request", "body": b"", "more_body": False}
            return message

        async def guarded_send(message: Message) -> None:
            # The app saw a truncated body; whatever it answers, the client gets the 413.
            if not exceeded:
                await send(message)
            elif message["type"] == "http.response.start":
                await self._reject(send)

        await self.app(scope, limited_receive, guarded_send)

    async def _reject(self, send: Send) -> None:
        exc = too_large(self.max_bytes)
        body = orjson.dumps(error_body(413, exc.message, type=exc.type, param=None, code=exc.code))
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
