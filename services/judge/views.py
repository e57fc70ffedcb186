"""``POST /criteria/judge``: one criterion's verdict on one output (the OpenPipe SDK's
``get_criterion_judgement``)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from services.common.auth import require_project
from services.common.errors import APIError

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


@router.post("/criteria/judge", response_model=JudgeOut, response_model_exclude_none=True)
async def judge_criterion(
    body: JudgeBody, request: Request, response: Response, project_id: str = Depends(require_project)
) -> JudgeOut:
    """Unknown criterion or version: 404 ``criterion_not_found``. A judge model that fails after
    retries: its status (429 rate limited, 400 when the judge model cannot be routed, else 502),
    with ``code`` saying why (``invalid_judgement`` for a reply that stayed malformed)."""
    service = request.app.state.judge_service
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
    # Server-Timing: how long the judge model took, so callers can tell the judge's own time apart.
    response.headers["server-timing"] = f"model;dur={verdict.usage.model_seconds * 1000:.2f}"
    return JudgeOut(
        score=verdict.score,
        explanation=verdict.explanation,
        usage=JudgeUsageOut(**verdict.usage.as_dict()),
        criterion_id=criterion.id,
        judgement=verdict.judgement or "",
    )
