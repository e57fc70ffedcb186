"""HTTP plumbing shared by every service."""

from __future__ import annotations

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common.errors import APIError, error_body

API_PREFIX = "/api/v1"


def too_large(max_bytes: int) -> APIError:
    return APIError(
        413, f"Request body is larger than the limit of {max_bytes} bytes.", code="request_too_large"
    )


class BodySizeLimit:
    """Refuses bodies over ``max_bytes`` with a 413: up front by Content-Length, or while streaming.

    A streamed body that grows too large raises inside the route, where the app's
    ``APIError`` handler turns it into the same 413.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise too_large(self.max_bytes)
            return message

        await self.app(scope, limited_receive, send)

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
