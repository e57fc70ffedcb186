"""``POST /datasets/{id}/import-logs`` (thin): record the job, run it in the background, answer 202.

Poll the job (``GET /datasets/{id}/jobs/{job_id}``) for progress and the result counts.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.api.datasets import jobs
from services.api.datasets.schemas import JobOut
from services.api.datasets.service import job_out
from services.api.log_imports import service
from services.api.log_imports.schemas import ImportLogsRequest
from services.common.auth import require_project

router = APIRouter(tags=["datasets"])


@router.post("/datasets/{dataset_id}/import-logs", response_model=JobOut, status_code=202)
async def import_logs(
    dataset_id: str, body: ImportLogsRequest, request: Request, project_id: str = Depends(require_project)
) -> JobOut:
    sessions: async_sessionmaker[AsyncSession] = request.app.state.sessions
    importer: service.LogImporter = request.app.state.log_importer
    async with sessions.begin() as session:
        job = await service.start_import(
            session=session, project_id=project_id, dataset_id=dataset_id, body=body
        )
    jobs.run_in_background(
        sessions,
        job.id,
        lambda: service.run_import(
            sessions=sessions,
            importer=importer,
            job_id=job.id,
            project_id=project_id,
            dataset_id=dataset_id,
            body=body,
        ),
    )
    return job_out(job)
