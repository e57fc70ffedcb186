"""HTTP plumbing shared by every service."""

from __future__ import annotations

import asyncio
import json
import math
import re
from typing import Any

import orjson
from pydantic import BaseModel
from pydantic_core import from_json
from starlette.applications import Starlette
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from services.common.errors import APIError, bad_request, error_body

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
        if declared is not None and declared.isdigit():
            if int(declared) <= self.max_bytes:
                # The server reads exactly Content-Length bytes as the body: nothing to watch.
                await self.app(scope, receive, send)
                return
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


# --- one JSON policy for every request body ------------------------------------------------------
#
# Every route (FastAPI or framework-free) reads JSON through ``loads_json``: UTF-8 only (a leading
# UTF-8 byte-order mark is ignored, UTF-16/32 bodies are refused), no NaN/Infinity, no number that
# does not fit the stores (integers within 64 bits, finite floats) and no lone UTF-16 surrogate in
# a string. A refusal is a 400 naming the offending field as ``a.0.b`` (the pydantic style).

UTF8_BOM = b"\xef\xbb\xbf"
MIN_JSON_INT = -(2**63)
MAX_JSON_INT = 2**64 - 1
# Every integer outside [MIN_JSON_INT, MAX_JSON_INT] is written with 19 digits or more: a body
# mapped digit -> "0", anything else -> " " holds a run of 19 zeros (a C search; a regex took 10x).
_DIGITS_AS_ZEROS = bytes(0x30 if 0x30 <= byte <= 0x39 else 0x20 for byte in range(256))
_NINETEEN_DIGITS = b"0" * 19
JSON_POLICY = (
    "JSON bodies must be UTF-8 (a leading byte-order mark is ignored); numbers must be finite "
    "(no NaN or Infinity) and integers fit in 64 bits; strings must be valid Unicode."
)


def loads_json(body: bytes, *, subject: str = "Request body") -> Any:
    """Parse a request body under the platform's JSON policy; a 400 naming the field otherwise.

    ``subject`` names the document in messages (say, "The line" for a line of an upload)."""
    if body.startswith(UTF8_BOM):
        body = body[len(UTF8_BOM) :]
    if _NINETEEN_DIGITS not in body.translate(_DIGITS_AS_ZEROS):
        # orjson refuses NaN, Infinity, overflowing floats, lone surrogates and invalid UTF-8 as
        # the policy does, at a third of the cost; it would turn an integer beyond 64 bits into a
        # float, so a body with a number that long takes the checked path below.
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            pass  # refused: the checked path below says why and where
    try:
        value = from_json(body, allow_inf_nan=False)
    except ValueError as exc:
        raise _diagnose(body, str(exc), subject) from None
    if not _representable(value):
        raise _diagnose(body, "", subject)
    return value


def _representable(value: Any) -> bool:
    """Fast check of a parsed body: every int within 64 bits, every float finite."""
    kind = type(value)
    if kind is dict:
        return all(map(_representable, value.values()))
    if kind is list:
        return all(map(_representable, value))
    if kind is int:
        return MIN_JSON_INT <= value <= MAX_JSON_INT
    if kind is float:
        return value - value == 0.0  # false for inf and nan
    return True


def _diagnose(body: bytes, parser_message: str, subject: str) -> APIError:
    """Why a body broke the policy, and where: parsed again leniently to find the field."""
    if body[:4].count(0) or body[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return bad_request(
            f"{subject} must be UTF-8 encoded JSON (UTF-16/UTF-32 is not accepted).",
            param="body",
            code="invalid_json",
        )
    try:
        lenient = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        reason = parser_message or "malformed JSON"
        return bad_request(f"{subject} is not valid JSON: {reason}", param="body", code="invalid_json")
    found = _first_problem(lenient, ())
    if found is None:  # the lenient parser disagrees (say, on an unusual escape): report the strict one
        reason = parser_message or "malformed JSON"
        return bad_request(f"{subject} is not valid JSON: {reason}", param="body", code="invalid_json")
    path, problem = found
    field = ".".join(str(p) for p in path) or "body"
    return bad_request(
        f"Invalid JSON value at {field}: {problem}. {JSON_POLICY}", param=field, code="invalid_json"
    )


def _first_problem(value: Any, path: tuple) -> tuple[tuple, str] | None:
    if isinstance(value, dict):
        for key, item in value.items():
            if _has_lone_surrogate(key):
                return (*path, ascii(key)[1:-1]), "a key holds a lone UTF-16 surrogate"
            found = _first_problem(item, (*path, key))
            if found:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = _first_problem(item, (*path, index))
            if found:
                return found
    elif isinstance(value, bool):
        return None
    elif isinstance(value, int) and not MIN_JSON_INT <= value <= MAX_JSON_INT:
        return path, "integer outside the 64-bit range"
    elif isinstance(value, float) and not math.isfinite(value):
        return path, "number is not finite (NaN, Infinity or beyond the float range)"
    elif isinstance(value, str) and _has_lone_surrogate(value):
        return path, "string holds a lone UTF-16 surrogate (not valid Unicode)"
    return None


def _has_lone_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _json_content(scope: Scope) -> bool:
    """Whether FastAPI would parse this body as JSON: no Content-Type, ``application/json`` or a
    ``+json`` type (JSON Lines, forms and files are the views' own business)."""
    value = dict(scope["headers"]).get(b"content-type", b"").split(b";")[0].strip().lower()
    return value in (b"", b"application/json") or (
        value.startswith(b"application/") and value.endswith(b"+json")
    )


class JsonBodies:
    """Applies ``loads_json`` to every JSON request body before FastAPI's own (lenient) parser sees it.

    A refused body gets the 400 here; an accepted one is passed on unchanged (less a UTF-8 BOM).
    Streamed-body routes (uploads) are skipped: they parse line by line with ``loads_json``.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] not in ("POST", "PUT", "PATCH", "DELETE")
            or not _json_content(scope)
            or BodySizeLimit._exempt(scope)
        ):
            await self.app(scope, receive, send)
            return
        try:
            body = await read_body(receive)
        except APIError:
            return  # the client is gone
        if body.strip():
            try:
                loads_json(body)
            except APIError as exc:
                await send_error(send, exc)
                return
            if body.startswith(UTF8_BOM):
                body = body[len(UTF8_BOM) :]
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


# --- OpenAPI for views that read the raw body or query string themselves -----------------------


def openapi_json_body(model: type[BaseModel], *, description: str | None = None) -> dict:
    """``openapi_extra`` declaring ``model`` as the JSON request body of a view that parses it itself
    (framework-free fast paths, forwarded bodies); the schema is inlined (no ``$defs`` refs)."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})
    body: dict[str, Any] = {
        "required": True,
        "content": {"application/json": {"schema": _inline(schema, definitions)}},
    }
    if description:
        body["description"] = description
    return {"requestBody": body}


def _inline(node: Any, definitions: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            return _inline(definitions[ref.removeprefix("#/$defs/")], definitions)
        return {key: _inline(value, definitions) for key, value in node.items()}
    if isinstance(node, list):
        return [_inline(item, definitions) for item in node]
    return node


def openapi_query(*parameters: tuple[str, dict[str, Any], str]) -> dict:
    """``openapi_extra`` documenting the query parameters a view reads from ``request.query_params``:
    ``(name, JSON schema, description)`` each, all optional."""
    return {
        "parameters": [
            {"name": name, "in": "query", "required": False, "schema": schema, "description": description}
            for name, schema, description in parameters
        ]
    }


# --- one socket write per response ---------------------------------------------------------------

COALESCE_LIMIT = 64 * 1024  # a larger pending write (a streamed export, say) leaves at once


class CoalescedWrites:
    """A transport whose writes within one event-loop iteration leave in one ``send``.

    uvicorn writes a response's status line and headers, then its body, each straight to the
    socket: two system calls (and two wake-ups of the client) for every small JSON answer. Here
    they are joined and written at the end of the iteration; everything else is the transport's.
    """

    __slots__ = ("_transport", "_loop", "_pending", "_size")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []
        self._size = 0

    def write(self, data: bytes) -> None:
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(data)
        self._size += len(data)
        if self._size >= COALESCE_LIMIT:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            self._size = 0
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol over ``CoalescedWrites`` (pass as ``uvicorn.Config(http=...)``)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescedWrites(transport, self.loop))  # type: ignore[arg-type]
