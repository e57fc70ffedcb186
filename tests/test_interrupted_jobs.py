"""Dataset jobs a dead api process left queued or running are failed when the api starts again."""

from __future__ import annotations

import secrets
from pathlib import Path

from services.api.datasets import jobs
from services.api.datasets.models import DatasetJob
from services.api.datasets.service import create_dataset
from services.api.projects import service as projects
from services.common.kafka import TansuBroker
from services.platform import Platform
from tests.conftest import platform_settings


async def test_jobs_left_running_are_failed_at_the_next_start(
    tmp_path: Path, tansu: TansuBroker, chdb_url: str
) -> None:
    settings = platform_settings(tmp_path, tansu.url, chdb_url, bootstrap_api_key=None)
    first = Platform(settings, services=("api",))
    await first.start()
    try:
        async with first.state["sessions"].begin() as session:
            project = await projects.create_project(session=session, name=f"jobs-{secrets.token_hex(4)}")
            dataset = await create_dataset(session=session, project_id=project.id, name="interrupted")
            ids = {}
            for kind, status in (("upload", "running"), ("export", "queued"), ("relabel", "running")):
                job = await jobs.create_job(
                    session=session, project_id=project.id, dataset_id=dataset.id, kind=kind
                )
                job.status = status
                ids[kind] = job.id
            done = await jobs.create_job(
                session=session, project_id=project.id, dataset_id=dataset.id, kind="upload"
            )
            done.status = "succeeded"
    finally:
        await first.stop()  # as if the process died: the jobs stay as they were written

    second = Platform(settings, services=("api",))
    await second.start()
    try:
        async with second.state["sessions"]() as session:
            status = {kind: (await session.get(DatasetJob, job_id)) for kind, job_id in ids.items()}
            finished = await session.get(DatasetJob, done.id)
    finally:
        await second.stop()
    assert status["upload"].status == status["export"].status == "failed"
    assert "interrupted" in status["upload"].result["reason"]
    # Relabel jobs finish from relabel.results.v1, which survives the api process.
    assert status["relabel"].status == "running"
    assert finished.status == "succeeded"
