"""``POST /chat/completions`` without the web framework, for the router's latency budget.

Same checks and answers as the FastAPI route in ``views.py`` (both parse with ``protocol`` and call
``ChatService.respond``) (auth, body limit, validation,
``op-*`` headers, the error envelope, SSE streaming); bench/router.py measured the framework's
routing and dependency injection as most of what the router adds per call.
"""

from __future__ import annotations

import orjson
from starlette.datastructures import Headers
from starlette.types import Receive, Scope, Send

from services.common.auth import KeyRing, resolve_project
from services.common.errors import APIError
from services.common.http import bearer_header, read_body, send_bytes, send_error
from services.router.protocol import http_call_options, parse_chat_request
from services.router.service import RouterDeps, as_sse

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
STREAM_HEADERS = [
    (b"content-type", b"text/event-stream"),
    *((k.encode(), v.encode()) for k, v in SSE_HEADERS.items()),
]


class ChatCompletionsEndpoint:
    def __init__(self, *, keyring: KeyRing, deps: RouterDeps) -> None:
        self.keyring = keyring
        self.deps = deps

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            project_id = resolve_project(self.keyring, bearer_header(scope))
            raw, body = parse_chat_request(await read_body(receive))
            options = http_call_options(Headers(scope=scope), body)
            result = await self.deps.chat.respond(
                project_id=project_id, raw=raw, options=options, stream=bool(body.stream)
            )
        except APIError as exc:
            await send_error(send, exc)
            return
        if isinstance(result, dict):
            await send_bytes(send, 200, orjson.dumps(result))
            return
        chunks = as_sse(result)
        await send({"type": "http.response.start", "status": 200, "headers": STREAM_HEADERS})
        try:
            async for event in chunks:
                await send({"type": "http.response.body", "body": event, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            await chunks.aclose()  # a client that went away still gets its call logged
