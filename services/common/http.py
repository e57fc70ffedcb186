"""HTTP plumbing shared by every service."""

from __future__ import annotations

import re

import orjson
from starlette.applications import Starlette
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common.errors import APIError, error_body

API_PREFIX = "/api/v1"
# Bodies refused by Content-Length are read and discarded up to this size before the 413;
# beyond it the connection is closed at once rather than spend bandwidth on them.
DRAIN_LIMIT = 64 * 1024 * 1024
# app.state attribute: the (method, path regex) of routes exempt from BodySizeLimit.
_STREAMED_BODY_ROUTES = "streamed_body_routes"


def exempt_from_body_limit(app: Starlette, method: str, path: str) -> None:
    """Let ``method path`` (a route template, API prefix included) past ``BodySizeLimit``.

    For routes that stream their body and enforce their own, larger limit (file uploads).
    """
    routes: list[tuple[str, re.Pattern[str]]] | None = getattr(app.state, _STREAMED_BODY_ROUTES, None)
    if routes is None:
        routes = []
        setattr(app.state, _STREAMED_BODY_ROUTES, routes)
    routes.append((method.upper(), compile_path(path)[0]))


async def drain_body(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


def too_large(max_bytes: int) -> APIError:
    return APIError(
        413, f"Request body is larger than the limit of {max_bytes} bytes.", code="request_too_large"
    )


class BodySizeLimit:
    """Refuses bodies over ``max_bytes`` with a 413: up front by Content-Length, or while streaming.

    Routes registered with ``exempt_from_body_limit`` (uploads) pass: they enforce their own limit.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    @staticmethod
    def _exempt(scope: Scope) -> bool:
        state = getattr(scope.get("app"), "state", None)
        routes = getattr(state, _STREAMED_BODY_ROUTES, None)
        if not routes:
            return False
        path, root = scope["path"], scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        return any(method == scope["method"] and regex.match(path) for method, regex in routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._exempt(scope):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            if int(declared) <= self.max_bytes + DRAIN_LIMIT:
                await drain_body(receive)  # so the client, still sending, can read the 413
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
                        await drain_body(receive)
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


# --- framework-free endpoints (see services/platform.py FastRoutes) ------------------------------


async def read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise APIError(499, "The client disconnected before sending the whole body.")
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def bearer_header(scope: Scope) -> str | None:
    value = dict(scope["headers"]).get(b"authorization")
    return value.decode("latin-1") if value else None


async def send_bytes(send: Send, status: int, body: bytes, content_type: bytes = b"application/json") -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def send_error(send: Send, exc: APIError) -> None:
    body = error_body(exc.status_code, exc.message, type=exc.type, param=exc.param, code=exc.code)
    await send_bytes(send, exc.status_code, orjson.dumps(body))
