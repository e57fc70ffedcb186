"""``POST /datasets/{id}/relabel``: start a relabel job (progress at ``GET /datasets/{id}/jobs/{job_id}``)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from services.api.datasets import jobs
from services.api.datasets.service import get_dataset, job_out
from services.api.relabel import service
from services.api.relabel.models import RelabelStart
from services.common.auth import require_project
from services.common.errors import bad_request

router = APIRouter(tags=["relabel"])


@router.post("/datasets/{dataset_id}/relabel", status_code=202)
async def start_relabel(
    dataset_id: str, body: RelabelStart, request: Request, project_id: str = Depends(require_project)
) -> JSONResponse:
    async with request.app.state.sessions.begin() as session:
        dataset = await get_dataset(session=session, project_id=project_id, dataset_id=dataset_id)
        entries = await service.chosen_entries(session=session, dataset=dataset, start=body)
        if not entries:
            raise bad_request("No entries match: nothing to relabel.", param="filters")
        job = await jobs.create_job(
            session=session,
            project_id=project_id,
            dataset_id=dataset.id,
            kind="relabel",
            total=len(entries),
            params={"model": body.model, "track_rejected": body.track_rejected},
        )
        jobs.record_progress(job, status="running")
        # Published before the commit: if Kafka refuses, the job is rolled back and the client retries.
        await service.publish_batches(
            broker=request.app.state.broker, requests=service.batches(job, dataset, body.model, entries)
        )
        out = job_out(job)
    return JSONResponse(out.model_dump(mode="json"), status_code=202)
