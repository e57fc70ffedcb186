"""The router's gRPC ``Inference`` for Distillery's own services (relabel, judge, the api's
criteria jobs): called as an internal service on a project's behalf, unlogged."""

from __future__ import annotations

import grpc
import orjson

from services.common import tracing
from services.common.auth import INTERNAL_TOKEN_HEADER, PROJECT_HEADER
from services.common.grpc.distillery.v1 import inference_pb2, inference_pb2_grpc


class InferenceClient:
    """The router's gRPC ``Inference``, called as an internal service on a project's behalf."""

    def __init__(self, target: str, internal_token: str, *, timeout: float = 300.0) -> None:
        self._channel = grpc.aio.insecure_channel(target, interceptors=[tracing.ClientTracing()])
        self._stub = inference_pb2_grpc.InferenceStub(self._channel)
        self._token = internal_token
        self.timeout = timeout

    async def complete(self, project_id: str, request: dict) -> dict:
        response = await self._stub.Complete(
            inference_pb2.CompletionRequest(request_json=orjson.dumps(request).decode(), log_request=False),
            metadata=((INTERNAL_TOKEN_HEADER, self._token), (PROJECT_HEADER, project_id)),
            timeout=self.timeout,
        )
        return orjson.loads(response.completion_json)

    async def close(self) -> None:
        await self._channel.close()


def completion_output(completion: dict) -> dict:
    """The first choice's message as an entry output (role, content, tool calls)."""
    message = dict((completion.get("choices") or [{}])[0].get("message") or {})
    if not message:
        raise ValueError("the model returned no message")
    output = {"role": "assistant", "content": message.get("content")}
    if message.get("tool_calls"):
        output["tool_calls"] = message["tool_calls"]
    return output
