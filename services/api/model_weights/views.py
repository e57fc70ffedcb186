"""Weights export route (thin): ``GET /models/{slug}/weights?format=adapter|merged``."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse

from services.api.model_weights import service
from services.common.auth import require_project

router = APIRouter(tags=["models"])


@router.get("/models/{slug}/weights")
async def export_weights(
    request: Request,
    slug: str,
    format: Literal["adapter", "merged"] = Query("adapter", description="adapter as trained, or merged"),
    project_id: str = Depends(require_project),
) -> StreamingResponse:
    """A tar of safetensors weights, config, tokenizer and model card (README.md)."""
    state = request.app.state
    async with state.sessions() as session:
        model, job = await service.load_exportable(session=session, project_id=project_id, slug=slug)
    settings = state.settings
    export = await service.prepare_export(
        model=model,
        job=job,
        format=format,
        blobs=state.blobs,
        store_dir=settings.resolved_model_store_dir(),
    )
    return StreamingResponse(
        service.stream_tar(export),
        media_type="application/x-tar",
        headers={"content-disposition": f'attachment; filename="{export.filename}"'},
    )
