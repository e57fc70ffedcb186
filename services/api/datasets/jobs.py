"""Long dataset work (upload parsing, log import, relabel, export) as jobs with progress.

A job row is the progress report clients poll (``GET /datasets/{id}/jobs/{job_id}``). The
work itself runs as a background task in the api process, committing progress as it goes;
jobs left ``running`` by a process that died are marked failed at the next start.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.api.datasets.models import DatasetJob
from services.common.clock import now
from services.common.errors import not_found
from services.common.ids import new_id

log = logging.getLogger(__name__)

MAX_STORED_ERRORS = 1000
_background: set[asyncio.Task] = set()


async def create_job(
    *,
    session: AsyncSession,
    project_id: str,
    dataset_id: str,
    kind: str,
    params: dict[str, Any] | None = None,
    total: int | None = None,
) -> DatasetJob:
    moment = now()
    job = DatasetJob(
        id=new_id("job"),
        project_id=project_id,
        dataset_id=dataset_id,
        kind=kind,
        status="queued",
        progress_done=0,
        progress_total=total,
        errors=[],
        error_count=0,
        params=params or {},
        result={},
        created_at=moment,
        updated_at=moment,
    )
    session.add(job)
    await session.flush()
    return job


async def get_job(*, session: AsyncSession, project_id: str, dataset_id: str, job_id: str) -> DatasetJob:
    job = await session.get(DatasetJob, job_id)
    if job is None or job.project_id != project_id or job.dataset_id != dataset_id:
        raise not_found(f"No job with id {job_id!r} on this dataset.", param="job_id")
    return job


async def list_jobs(*, session: AsyncSession, project_id: str, dataset_id: str) -> list[DatasetJob]:
    return list(
        await session.scalars(
            select(DatasetJob)
            .where(DatasetJob.project_id == project_id, DatasetJob.dataset_id == dataset_id)
            .order_by(DatasetJob.created_at.desc())
        )
    )


def record_progress(
    job: DatasetJob,
    *,
    done: int | None = None,
    total: int | None = None,
    errors: list[dict[str, Any]] | None = None,
    status: str | None = None,
) -> None:
    if done is not None:
        job.progress_done = done
    if total is not None:
        job.progress_total = total
    if errors:
        job.error_count += len(errors)
        room = MAX_STORED_ERRORS - len(job.errors)
        if room > 0:
            job.errors = [*job.errors, *errors[:room]]
    if status is not None:
        job.status = status
    job.updated_at = now()


def finish(job: DatasetJob, *, result: dict[str, Any] | None = None) -> None:
    """succeeded, partial (some rows failed) or failed (nothing done and something failed)."""
    if job.error_count and not job.progress_done:
        job.status = "failed"
    elif job.error_count:
        job.status = "partial"
    else:
        job.status = "succeeded"
    job.result = {**job.result, **(result or {})}
    job.updated_at = now()


def run_in_background(
    sessions: async_sessionmaker[AsyncSession], job_id: str, work: Callable[[], Awaitable[None]]
) -> None:
    """Run ``work`` detached from the request; an unexpected crash marks the job failed."""

    async def guarded() -> None:
        try:
            await work()
        except Exception as exc:
            log.exception("job %s crashed", job_id)
            async with sessions.begin() as session:
                job = await session.get(DatasetJob, job_id)
                if job is not None:
                    record_progress(
                        job, errors=[{"message": f"internal error: {type(exc).__name__}"}], status="failed"
                    )

    task = asyncio.create_task(guarded(), name=f"dataset-job-{job_id}")
    _background.add(task)
    task.add_done_callback(_background.discard)


async def fail_interrupted_jobs(*, session: AsyncSession) -> int:
    """At start-up: jobs a dead process left queued or running will never finish."""
    result = await session.execute(
        update(DatasetJob)
        .where(DatasetJob.status.in_(("queued", "running")))
        .where(DatasetJob.kind != "relabel")
        .values(
            status="failed",
            updated_at=now(),
            result={"reason": "interrupted: the api process stopped before the job finished; run it again"},
        )
    )
    return result.rowcount or 0
