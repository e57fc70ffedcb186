"""``POST /report`` without the web framework: the highest-volume route, served straight from ASGI.

Same checks and answers as the FastAPI routes in ``views.py`` (auth, body limit, validation,
the error envelope); it skips only routing, dependency injection and response models,
which cost more than the work itself at thousands of reports per second (see bench/ingest.py).
"""

from __future__ import annotations

import orjson
from starlette.types import Receive, Scope, Send

from services.common.auth import KeyRing, resolve_project
from services.common.errors import APIError, error_body
from services.ingest.views import OK_BODY, IngestDeps, record_report


class ReportEndpoint:
    def __init__(self, route: str, *, keyring: KeyRing, deps: IngestDeps) -> None:
        self.route = route
        self.keyring = keyring
        self.deps = deps

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            authorization = dict(scope["headers"]).get(b"authorization")
            project_id = resolve_project(
                self.keyring, authorization.decode("latin-1") if authorization else None
            )
            await record_report(self.deps, self.route, await _read_body(receive), project_id)
        except APIError as exc:
            body = error_body(exc.status_code, exc.message, type=exc.type, param=exc.param, code=exc.code)
            await _respond(send, exc.status_code, orjson.dumps(body))
            return
        await _respond(send, 200, OK_BODY)


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise APIError(499, "The client disconnected before sending the whole body.")
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _respond(send: Send, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
