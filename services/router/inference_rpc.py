"""gRPC ``Inference``: chat completions for other services (relabel, judge, eval) without HTTP.

Both calls go through the same ``ChatService`` as ``POST /chat/completions``, so routing,
caching, logging, fallback, pruning and mixture of agents are identical. The caller's
project comes from ``authorization: Bearer <key>`` metadata, exactly as over HTTP, or, for
Distillery's own services, from the internal token (see ``services.common.auth``).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any, NoReturn

import grpc
import orjson

from services.common.auth import KeyRing, resolve_grpc_project
from services.common.errors import APIError
from services.common.grpc.distillery.v1 import inference_pb2, inference_pb2_grpc
from services.common.rpc import error_metadata, status_code
from services.router.protocol import CallOptions, parse_rpc_request, rpc_call_options
from services.router.service import RouterDeps

log = logging.getLogger(__name__)

INTERNAL_ERROR = "The inference router failed unexpectedly. Retry later."


async def _abort(context: grpc.aio.ServicerContext, exc: APIError) -> NoReturn:
    """End the call with the mapped code and the client-safe message (never a key)."""
    await context.abort(status_code(exc.status_code), exc.message, trailing_metadata=error_metadata(exc))
    raise AssertionError("unreachable: context.abort raises")


def _client_error(exc: Exception, rpc: str) -> APIError:
    """What the caller gets for ``exc``: an ``APIError`` as it is, anything else a logged 500.
    Call it in the ``except`` block (the log keeps the traceback)."""
    if isinstance(exc, APIError):
        return exc
    log.exception("Inference.%s failed", rpc)
    return APIError(500, INTERNAL_ERROR, type="server_error")


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, deps: RouterDeps, keyring: KeyRing, internal_token: str | None = None) -> None:
        self.deps = deps
        self.keyring = keyring
        self.internal_token = internal_token

    async def _prepare(
        self, request: inference_pb2.CompletionRequest, context: grpc.aio.ServicerContext, *, stream: bool
    ) -> tuple[str, dict[str, Any], CallOptions]:
        try:
            project_id = resolve_grpc_project(
                self.keyring, context.invocation_metadata(), self.internal_token
            )
            raw, body = parse_rpc_request(request.request_json, stream=stream)
            options = rpc_call_options(request, body)
        except APIError as exc:
            await _abort(context, exc)
        return project_id, raw, options

    async def Complete(
        self, request: inference_pb2.CompletionRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.CompletionResponse:
        project_id, raw, options = await self._prepare(request, context, stream=False)
        error: APIError | None = None
        try:
            completion = await self.deps.chat.respond(
                project_id=project_id, raw=raw, options=options, stream=False
            )
        except Exception as exc:
            error = _client_error(exc, "Complete")
        if error is not None:
            await _abort(context, error)
        return inference_pb2.CompletionResponse(completion_json=orjson.dumps(completion).decode())

    async def StreamComplete(
        self, request: inference_pb2.CompletionRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.CompletionChunk]:
        project_id, raw, options = await self._prepare(request, context, stream=True)
        error: APIError | None = None
        try:
            chunks = await self.deps.chat.respond(
                project_id=project_id, raw=raw, options=options, stream=True
            )
            async with aclosing(chunks):  # a caller that cancels still gets its call logged
                async for chunk in chunks:
                    yield inference_pb2.CompletionChunk(chunk_json=orjson.dumps(chunk).decode())
        except Exception as exc:
            error = _client_error(exc, "StreamComplete")
        if error is not None:
            await _abort(context, error)


def add_to_server(
    server: grpc.aio.Server, *, deps: RouterDeps, keyring: KeyRing, internal_token: str | None = None
) -> None:
    """``internal_token`` lets Distillery's own services (relabel, judge, eval) call for a project."""
    inference_pb2_grpc.add_InferenceServicer_to_server(
        InferenceServicer(deps, keyring, internal_token), server
    )
