"""``POST /criteria/judge``: one criterion's verdict on one output (the OpenPipe SDK's
``get_criterion_judgement``)."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.types import Receive, Scope, Send

from services.common.auth import KeyRing, require_project, resolve_project
from services.common.errors import APIError, invalid_input
from services.common.http import bearer_header, loads_json, read_body, send_error

router = APIRouter(tags=["criteria"])


class JudgeInput(BaseModel):
    model_config = ConfigDict(extra="allow")

    messages: list[dict[str, Any]] = Field(default_factory=list)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None


class JudgeOutput(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str = "assistant"
    content: str | list[Any] | None = None
    tool_calls: list[dict[str, Any]] | None = None


class JudgeBody(BaseModel):
    criterion_id: str = Field(min_length=1, max_length=300, description='"name" (latest) or "name@vN"')
    input: JudgeInput | None = None
    output: JudgeOutput


class JudgeUsageOut(BaseModel):
    total_tokens: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float | None = None


class JudgeOut(BaseModel):
    score: float = Field(description="1 = PASS, 0 = FAIL")
    explanation: str
    usage: JudgeUsageOut
    criterion_id: str = Field(description="the version that judged: name@vN")
    judgement: str = Field(description="PASS or FAIL")


async def judge_once(service: Any, project_id: str, body: JudgeBody) -> tuple[JudgeOut, float]:
    """The verdict and the seconds spent waiting for the judge model. Unknown criterion or version:
    404 ``criterion_not_found``. A judge model that fails after retries: its status (429 rate
    limited, 400 when the judge model cannot be routed, 422 ``invalid_judgement`` when its reply
    stayed malformed, else 502), with ``code`` saying why."""
    criterion = await service.catalog.resolve(project_id, body.criterion_id)
    row_input = body.input.model_dump(exclude_none=True) if body.input else {}
    output = body.output.model_dump(exclude_none=True)
    verdict = await service.judge.judge(project_id, criterion, row_input, output, source="api")
    if verdict.status != "success":
        raise APIError(
            verdict.error_status,
            verdict.error_message or "The judge model failed.",
            type="server_error" if verdict.error_status >= 500 else "invalid_request_error",
            code=verdict.error_code,
        )
    out = JudgeOut(
        score=verdict.score,
        explanation=verdict.explanation,
        usage=JudgeUsageOut(**verdict.usage.as_dict()),
        criterion_id=criterion.id,
        judgement=verdict.judgement or "",
    )
    return out, verdict.usage.model_seconds


def server_timing(model_seconds: float) -> str:
    """How long the judge model took, so callers can tell the judge's own time apart."""
    return f"model;dur={model_seconds * 1000:.2f}"


@router.post("/criteria/judge", response_model=JudgeOut, response_model_exclude_none=True)
async def judge_criterion(
    body: JudgeBody, request: Request, response: Response, project_id: str = Depends(require_project)
) -> JudgeOut:
    """Also served framework-free by ``JudgeEndpoint`` (same checks and answers); see judge_once."""
    out, model_seconds = await judge_once(request.app.state.judge_service, project_id, body)
    response.headers["server-timing"] = server_timing(model_seconds)
    return out


class JudgeEndpoint:
    """``POST /criteria/judge`` without the web framework (its routing and dependency injection
    were a fifth of the judge's CPU per verdict): auth, the JSON policy, validation, the envelope."""

    def __init__(self, *, keyring: KeyRing, service: Any) -> None:
        self.keyring = keyring
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            project_id = resolve_project(self.keyring, bearer_header(scope))
            payload = loads_json(await read_body(receive))
            try:
                body = JudgeBody.model_validate(payload)
            except ValidationError as exc:
                raise invalid_input(exc.errors()) from None
            out, model_seconds = await judge_once(self.service, project_id, body)
        except APIError as exc:
            await send_error(send, exc)
            return
        raw = orjson.dumps(out.model_dump(exclude_none=True))
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(raw)).encode()),
            (b"server-timing", server_timing(model_seconds).encode()),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": raw})
