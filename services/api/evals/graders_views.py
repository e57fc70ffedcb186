"""``POST /fine_tuning/alpha/graders/run`` and ``/validate``, shaped as the OpenAI fine-tuning API."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from services.common.auth import require_project
from services.eval.grader_schemas import GraderHolder, GraderRunRequest
from services.eval.graders import GraderContext, make_sample, run_grader, validate_grader
from services.eval.sandbox import Limits

router = APIRouter(tags=["graders"])


def grader_context(request: Request, project_id: str) -> GraderContext:
    settings = request.app.state.settings
    return GraderContext(
        project_id=project_id,
        models=getattr(request.app.state, "grader_models", None),
        embedding_model=getattr(request.app.state, "grader_embedding_model", settings.eval_embedding_model),
        sandbox_limits=Limits(row_timeout=settings.eval_row_timeout_seconds),
        sandbox_network=settings.eval_sandbox_network,
        sandbox_root=settings.data_dir / "sandbox",
    )


@router.post("/fine_tuning/alpha/graders/validate")
async def validate(body: GraderHolder, project_id: str = Depends(require_project)) -> dict[str, Any]:
    validate_grader(body.grader)
    return {"grader": body.grader.model_dump(mode="json", exclude_none=True)}


@router.post("/fine_tuning/alpha/graders/run")
async def run(
    body: GraderRunRequest, request: Request, project_id: str = Depends(require_project)
) -> dict[str, Any]:
    validate_grader(body.grader)
    context = grader_context(request, project_id)
    try:
        result = await run_grader(
            body.grader, sample=make_sample(body.model_sample), item=body.item, context=context
        )
    finally:
        await context.close()
    return result.response()
