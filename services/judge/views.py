"""``POST /criteria/judge``: one criterion's verdict on one output (the OpenPipe SDK's
``get_criterion_judgement``)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from services.common.auth import require_project
from services.judge.protocol import JudgeBody, JudgeOut
from services.judge.service import judge_once

router = APIRouter(tags=["criteria"])


SERVER_TIMING_DOC = {
    "Server-Timing": {
        "description": "`judge;dur=<ms>, model;dur=<ms>`: the request's time in the judge and the "
        "part of it spent waiting for the judge model; the difference is the judge's own time.",
        "schema": {"type": "string"},
    }
}


@router.post(
    "/criteria/judge",
    response_model=JudgeOut,
    response_model_exclude_none=True,
    responses={200: {"headers": SERVER_TIMING_DOC}},
)
async def judge_criterion(
    body: JudgeBody, request: Request, response: Response, project_id: str = Depends(require_project)
) -> JudgeOut:
    """Also served framework-free by ``fastpath.JudgeEndpoint`` (same checks and answers); see
    ``service.judge_once``."""
    out, timing = await judge_once(request.app.state.judge_service, project_id, body)
    response.headers["server-timing"] = timing
    return out
