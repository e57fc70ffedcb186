"""What every gRPC call gets before its servicer runs: the body limit and a clear answer to bytes
that are not the request message.

gRPC itself would answer corrupt bytes with ``UNKNOWN "Unexpected <class 'DecodeError'>"`` (an
internal class name, outside the documented codes) and accept any request up to its transport
limit. This interceptor decodes the request itself, so both cases are ``INVALID_ARGUMENT`` /
``RESOURCE_EXHAUSTED`` with plain messages, in one place for every service.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from services.common.errors import APIError

Deserializer = Callable[[bytes], Any]
Decoder = Callable[[bytes, grpc.aio.ServicerContext], Awaitable[Any]]


def _message_name(deserialize: Deserializer) -> str:
    owner = getattr(deserialize, "__self__", None)  # ``Message.FromString`` is bound to the class
    return getattr(owner, "__name__", "request")


class StrictRequests(grpc.aio.ServerInterceptor):
    """Rejects requests over ``max_bytes`` and requests that are not valid protobuf, plainly."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None or handler.request_streaming:
            return handler
        decode = self._decoder(handler.request_deserializer)
        if handler.unary_unary:
            behaviour = handler.unary_unary

            async def unary_unary(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
                return await behaviour(await decode(raw, context), context)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, response_serializer=handler.response_serializer
            )
        behaviour = handler.unary_stream

        async def unary_stream(raw: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async for response in behaviour(await decode(raw, context), context):
                yield response

        return grpc.unary_stream_rpc_method_handler(
            unary_stream, response_serializer=handler.response_serializer
        )

    def _decoder(
        self, deserialize: Deserializer
    ) -> Callable[[bytes, grpc.aio.ServicerContext], Awaitable[Any]]:
        name = _message_name(deserialize)

        async def decode(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
            if len(raw) > self.max_bytes:
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"The request is {len(raw)} bytes; the limit is {self.max_bytes} bytes "
                    "(the same as an HTTP body: DISTILLERY_MAX_BODY_BYTES).",
                )
            try:
                return deserialize(raw)
            except DecodeError:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, f"The request is not a valid {name} protobuf message."
                )

        return decode


# --- the error envelope over gRPC: the HTTP status's code, the rest as trailing metadata ----------

STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def status_code(http_status: int) -> grpc.StatusCode:
    """The gRPC code for the HTTP status the same call would get over HTTP."""
    return STATUS_CODES.get(http_status, grpc.StatusCode.INTERNAL)


def error_metadata(exc: APIError) -> tuple[tuple[str, str], ...]:
    """The rest of the OpenAI error envelope (type, code, param) as trailing metadata."""
    fields = (("error-type", exc.type), ("error-code", exc.code), ("error-param", exc.param))
    return tuple((key, value) for key, value in fields if value and value.isascii())
