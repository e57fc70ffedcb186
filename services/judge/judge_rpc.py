"""gRPC ``Judge`` (``protos/distillery/v1/judge.proto``): verdicts for other services (eval, api).

A judge model that fails is an answer with ``status: "error"``, not a gRPC error; only a bad
request (unknown criterion, bad JSON, bad credentials) ends the call with a status code.
"""

from __future__ import annotations

import logging
from typing import Any, NoReturn

import grpc
import orjson

from services.common.auth import KeyRing, resolve_grpc_project
from services.common.errors import APIError, bad_request
from services.common.grpc.distillery.v1 import judge_pb2, judge_pb2_grpc
from services.common.rpc import error_metadata, status_code
from services.judge.criteria import CriteriaCatalog
from services.judge.service import Judge, Usage

log = logging.getLogger(__name__)


def parse_object(text: str, field: str, *, required: bool) -> dict[str, Any]:
    if not text.strip():
        if required:
            raise bad_request(f"{field} is required: a JSON object.", param=field)
        return {}
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"{field} is not valid JSON: {exc}", param=field) from None
    if not isinstance(value, dict):
        raise bad_request(f"{field} must be a JSON object.", param=field)
    return value


def _usage(usage: Usage) -> judge_pb2.JudgeUsage:
    out = judge_pb2.JudgeUsage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
    )
    if usage.cost_usd is not None:
        out.cost_usd = usage.cost_usd
    return out


async def _abort(context: grpc.aio.ServicerContext, exc: APIError) -> NoReturn:
    await context.abort(status_code(exc.status_code), exc.message, trailing_metadata=error_metadata(exc))
    raise AssertionError("unreachable: context.abort raises")


class JudgeServicer(judge_pb2_grpc.JudgeServicer):
    def __init__(
        self, catalog: CriteriaCatalog, judge: Judge, keyring: KeyRing, internal_token: str | None
    ) -> None:
        self.catalog = catalog
        self.judge = judge
        self.keyring = keyring
        self.internal_token = internal_token

    async def Judge(  # noqa: N802 (the RPC's name)
        self, request: judge_pb2.JudgeRequest, context: grpc.aio.ServicerContext
    ) -> judge_pb2.JudgeResponse:
        try:
            project_id = resolve_grpc_project(
                self.keyring, context.invocation_metadata(), self.internal_token
            )
            row_input = parse_object(request.input_json, "input_json", required=False)
            output = parse_object(request.output_json, "output_json", required=True)
            criterion = await self.catalog.resolve(project_id, request.criterion_id)
        except APIError as exc:
            await _abort(context, exc)
        verdict = await self.judge.judge(
            project_id, criterion, row_input, output, source=request.source or "grpc"
        )
        return judge_pb2.JudgeResponse(
            status=verdict.status,
            score=verdict.score,
            judgement=verdict.judgement or "",
            explanation=verdict.explanation,
            criterion_id=criterion.id,
            model=criterion.model,
            usage=_usage(verdict.usage),
            error_code=verdict.error_code or "",
            error_message=verdict.error_message or "",
            judgement_id=verdict.judgement_id,
        )

    async def HeadToHead(  # noqa: N802
        self, request: judge_pb2.HeadToHeadRequest, context: grpc.aio.ServicerContext
    ) -> judge_pb2.HeadToHeadResponse:
        try:
            project_id = resolve_grpc_project(
                self.keyring, context.invocation_metadata(), self.internal_token
            )
            row_input = parse_object(request.input_json, "input_json", required=False)
            a = parse_object(request.output_a_json, "output_a_json", required=True)
            b = parse_object(request.output_b_json, "output_b_json", required=True)
            model, instructions = request.model, request.instructions
            if request.criterion_id:
                criterion = await self.catalog.resolve(project_id, request.criterion_id)
                model, instructions = model or criterion.model, instructions or criterion.prompt
            if not model:
                raise bad_request("model (or criterion_id) is required.", param="model")
        except APIError as exc:
            await _abort(context, exc)
        preference = await self.judge.head_to_head(
            project_id,
            model=model,
            instructions=instructions,
            row_input=row_input,
            a=a,
            b=b,
            swap_check=request.swap_check,
        )
        return judge_pb2.HeadToHeadResponse(
            status=preference.status,
            winner=preference.winner or "",
            explanation=preference.explanation,
            model=model,
            usage=_usage(preference.usage),
            error_code=preference.error_code or "",
            error_message=preference.error_message or "",
        )


def add_to_server(
    server: grpc.aio.Server,
    *,
    catalog: CriteriaCatalog,
    judge: Judge,
    keyring: KeyRing,
    internal_token: str | None,
) -> None:
    judge_pb2_grpc.add_JudgeServicer_to_server(JudgeServicer(catalog, judge, keyring, internal_token), server)
