"""gRPC clients around the judge: the judge's way to its model (the router's ``Inference``) and
other services' way to the judge (``JudgeClient``, used by the api and the eval service)."""

from __future__ import annotations

from typing import Any

import grpc
import orjson

from services.common.auth import INTERNAL_TOKEN_HEADER, PROJECT_HEADER
from services.common.grpc.distillery.v1 import judge_pb2, judge_pb2_grpc
from services.common.inference_client import InferenceClient
from services.judge.service import ModelCaller, ModelError

RETRYABLE = {
    grpc.StatusCode.RESOURCE_EXHAUSTED: ("rate_limited", 429),
    grpc.StatusCode.UNAVAILABLE: ("upstream_error", 502),
    grpc.StatusCode.DEADLINE_EXCEEDED: ("upstream_timeout", 504),
    grpc.StatusCode.INTERNAL: ("upstream_error", 502),
}


def _trailing(exc: grpc.aio.AioRpcError, name: str) -> str | None:
    for key, value in exc.trailing_metadata() or ():
        if key == name and isinstance(value, str):
            return value
    return None


def model_error(exc: grpc.aio.AioRpcError) -> ModelError:
    """A router error as a judge ``ModelError``: transient codes are retryable; a judge model
    the router cannot route (unknown model, missing provider key) is the criterion's fault: 400."""
    code = exc.code()
    message = f"The judge model call failed: {exc.details()}"
    if code in RETRYABLE:
        error_code, status = RETRYABLE[code]
        return ModelError(message, code=error_code, retryable=True, status=status)
    return ModelError(
        message, code=_trailing(exc, "error-code") or "judge_model_error", retryable=False, status=400
    )


def router_caller(client: InferenceClient) -> ModelCaller:
    async def call(project_id: str, request: dict[str, Any]) -> dict[str, Any]:
        try:
            return await client.complete(project_id, request)
        except grpc.aio.AioRpcError as exc:
            raise model_error(exc) from None

    return call


class JudgeClient:
    """The judge's gRPC ``Judge``, called as an internal service on a project's behalf."""

    def __init__(self, target: str, internal_token: str, *, timeout: float = 300.0) -> None:
        self._channel = grpc.aio.insecure_channel(target)
        self._stub = judge_pb2_grpc.JudgeStub(self._channel)
        self._token = internal_token
        self.timeout = timeout

    def _metadata(self, project_id: str) -> tuple[tuple[str, str], ...]:
        return ((INTERNAL_TOKEN_HEADER, self._token), (PROJECT_HEADER, project_id))

    async def judge(
        self,
        project_id: str,
        criterion_id: str,
        row_input: dict[str, Any],
        output: dict[str, Any],
        source: str,
    ) -> judge_pb2.JudgeResponse:
        return await self._stub.Judge(
            judge_pb2.JudgeRequest(
                criterion_id=criterion_id,
                input_json=orjson.dumps(row_input).decode(),
                output_json=orjson.dumps(output).decode(),
                source=source,
            ),
            metadata=self._metadata(project_id),
            timeout=self.timeout,
        )

    async def head_to_head(
        self, project_id: str, request: judge_pb2.HeadToHeadRequest
    ) -> judge_pb2.HeadToHeadResponse:
        return await self._stub.HeadToHead(request, metadata=self._metadata(project_id), timeout=self.timeout)

    async def close(self) -> None:
        await self._channel.close()
