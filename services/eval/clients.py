"""The router as the eval service and the graders reach it: gRPC ``Inference`` and ``Embeddings``,
as an internal service acting for a project. gRPC errors come back as ``APIError`` with the HTTP
status the same call would get, so graders and workers handle one kind of failure."""

from __future__ import annotations

from typing import Any

import grpc
import orjson

from services.common.auth import INTERNAL_TOKEN_HEADER, PROJECT_HEADER
from services.common.errors import APIError
from services.common.grpc.distillery.v1 import (
    embeddings_pb2,
    embeddings_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
)

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.UNIMPLEMENTED: 501,
}
RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})


def api_error(exc: grpc.aio.AioRpcError) -> APIError:
    trailing = {k: v for k, v in (exc.trailing_metadata() or ()) if isinstance(v, str)}
    return APIError(
        HTTP_STATUS.get(exc.code(), 500),
        exc.details() or exc.code().name,
        type=trailing.get("error-type", "upstream_error"),
        code=trailing.get("error-code"),
        param=trailing.get("error-param"),
    )


class RouterClient:
    """Chat completions and embeddings through the router, for one project at a time."""

    def __init__(self, target: str, internal_token: str, *, timeout: float = 300.0) -> None:
        self._channel = grpc.aio.insecure_channel(
            target, options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)]
        )
        self._inference = inference_pb2_grpc.InferenceStub(self._channel)
        self._embeddings = embeddings_pb2_grpc.EmbeddingsStub(self._channel)
        self._token = internal_token
        self.timeout = timeout

    def _metadata(self, project_id: str) -> tuple[tuple[str, str], ...]:
        return ((INTERNAL_TOKEN_HEADER, self._token), (PROJECT_HEADER, project_id))

    async def complete(self, project_id: str, request: dict[str, Any], *, cache: str = "") -> dict[str, Any]:
        try:
            response = await self._inference.Complete(
                inference_pb2.CompletionRequest(
                    request_json=orjson.dumps(request).decode(), log_request=False, cache=cache
                ),
                metadata=self._metadata(project_id),
                timeout=self.timeout,
            )
        except grpc.aio.AioRpcError as exc:
            raise api_error(exc) from None
        return orjson.loads(response.completion_json)

    async def embed(self, project_id: str, request: dict[str, Any]) -> dict[str, Any]:
        try:
            response = await self._embeddings.Embed(
                embeddings_pb2.EmbeddingRequest(
                    request_json=orjson.dumps(request).decode(), log_request=False, cache="readWrite"
                ),
                metadata=self._metadata(project_id),
                timeout=self.timeout,
            )
        except grpc.aio.AioRpcError as exc:
            raise api_error(exc) from None
        return orjson.loads(response.response_json)

    async def close(self) -> None:
        await self._channel.close()
