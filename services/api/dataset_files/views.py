"""Dataset files routes (thin): JSONL upload, export and download, snapshots.

The upload route (``UPLOAD_PATH``) streams its own body: registered with ``exempt_from_body_limit``,
the generic body limit does not apply to it, ``max_upload_bytes`` does. Its job is polled at
``GET /datasets/{id}/jobs/{job_id}``.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.api.dataset_files import service
from services.api.dataset_files.schemas import DatasetSnapshotList, DatasetSnapshotOut
from services.api.dataset_files.spool import spool_upload
from services.api.datasets.jobs import run_in_background
from services.api.datasets.models import DatasetSnapshot
from services.api.datasets.schemas import JobOut
from services.api.datasets.service import get_dataset, job_out
from services.common.auth import require_project
from services.common.blobstore import BlobNotFound, BlobStore, BlobStoreError
from services.common.errors import not_found, unavailable
from services.common.http import API_PREFIX
from services.common.settings import Settings

router = APIRouter(tags=["dataset files"])

UPLOAD_PATH = "/datasets/{dataset_id}/files"

_EXPORT_NAME = re.compile(service.EXPORT_NAME_PATTERN)


@dataclass
class FilesDeps:
    sessions: async_sessionmaker[AsyncSession]
    blobs: BlobStore
    settings: Settings

    @property
    def scratch(self) -> Path:
        """Temporary files (spooled uploads, exports and snapshots before they are stored)."""
        return self.settings.data_dir / "tmp"


def deps(request: Request) -> FilesDeps:
    state = request.app.state
    return FilesDeps(state.sessions, state.blobs, state.settings)


@contextmanager
def _blob_store_errors() -> Iterator[None]:
    try:
        yield
    except BlobNotFound:
        raise
    except BlobStoreError as exc:
        raise unavailable(f"The blob store is unavailable: {exc}") from None


# --- upload ----------------------------------------------------------------------------------


UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {"file": {"type": "string", "format": "binary"}},
                }
            },
            "application/jsonl": {"schema": {"type": "array", "items": {"type": "object"}}},
        },
    }
}


@router.post(UPLOAD_PATH, response_model=JobOut, status_code=202, openapi_extra=UPLOAD_BODY)
async def upload_file(
    dataset_id: str,
    request: Request,
    response: Response,
    d: FilesDeps = Depends(deps),
    project_id: str = Depends(require_project),
) -> JobOut:
    """A JSONL in the OpenAI chat fine-tuning format (multipart field ``file``, or the raw body)."""
    async with d.sessions() as session:
        await get_dataset(session=session, project_id=project_id, dataset_id=dataset_id)
    spooled = await spool_upload(request, limit=d.settings.max_upload_bytes, directory=d.scratch / "uploads")
    try:
        with _blob_store_errors():
            job, uri = await service.start_upload(
                sessions=d.sessions,
                blobs=d.blobs,
                project_id=project_id,
                dataset_id=dataset_id,
                spooled=spooled,
            )
    finally:
        await asyncio.to_thread(spooled.path.unlink, True)
    work = partial(service.process_upload, sessions=d.sessions, blobs=d.blobs, job_id=job.id, uri=uri)
    run_in_background(d.sessions, job.id, work)
    response.headers["Location"] = f"{API_PREFIX}/datasets/{dataset_id}/jobs/{job.id}"
    return job_out(job)


# --- export ----------------------------------------------------------------------------------


@router.post("/datasets/{dataset_id}/export", response_model=JobOut, status_code=202)
async def export_dataset(
    dataset_id: str,
    response: Response,
    d: FilesDeps = Depends(deps),
    project_id: str = Depends(require_project),
) -> JobOut:
    """A job writing the dataset as JSONL to the blob store; poll ``Location`` (the job): on success
    its ``result`` is the ``dataset.export`` (``download`` route, presigned ``url`` on S3, sizes)."""
    async with d.sessions.begin() as session:
        dataset = await get_dataset(session=session, project_id=project_id, dataset_id=dataset_id)
        job = await service.start_export(session=session, dataset=dataset)
    work = partial(service.run_export, sessions=d.sessions, blobs=d.blobs, job_id=job.id, workdir=d.scratch)
    run_in_background(d.sessions, job.id, work)
    response.headers["Location"] = f"{API_PREFIX}/datasets/{dataset_id}/jobs/{job.id}"
    return job_out(job)


@router.get("/datasets/{dataset_id}/exports/{name}")
async def download_export(
    dataset_id: str, name: str, d: FilesDeps = Depends(deps), project_id: str = Depends(require_project)
) -> StreamingResponse:
    async with d.sessions() as session:
        await get_dataset(session=session, project_id=project_id, dataset_id=dataset_id)
    missing = not_found(f"No export named {name!r} for this dataset.", param="name")
    if not _EXPORT_NAME.match(name):
        raise missing
    chunks = d.blobs.iter_chunks(service.export_key(project_id, dataset_id, name))
    try:
        with _blob_store_errors():
            first = await anext(chunks, b"")  # a missing blob fails here, before the response starts
    except BlobNotFound:
        raise missing from None

    async def body() -> AsyncIterator[bytes]:
        yield first
        async for chunk in chunks:
            yield chunk

    return StreamingResponse(
        body(),
        media_type=service.NDJSON,
        headers={"Content-Disposition": f'attachment; filename="{dataset_id}-{name}"'},
    )


# --- snapshots -------------------------------------------------------------------------------


@router.post("/datasets/{dataset_id}/snapshots", response_model=DatasetSnapshotOut)
async def create_snapshot(
    dataset_id: str, d: FilesDeps = Depends(deps), project_id: str = Depends(require_project)
) -> DatasetSnapshotOut:
    """The dataset with its pruning rules applied; an unchanged dataset gives back the same snapshot."""
    async with service.snapshot_lock(dataset_id), d.sessions.begin() as session:
        dataset = await get_dataset(session=session, project_id=project_id, dataset_id=dataset_id)
        with _blob_store_errors():
            snapshot = await service.create_snapshot(
                session=session, blobs=d.blobs, dataset=dataset, workdir=d.scratch
            )
    return service.snapshot_out(snapshot)


@router.get("/datasets/{dataset_id}/snapshots", response_model=DatasetSnapshotList)
async def list_snapshots(
    dataset_id: str, d: FilesDeps = Depends(deps), project_id: str = Depends(require_project)
) -> DatasetSnapshotList:
    async with d.sessions() as session:
        await get_dataset(session=session, project_id=project_id, dataset_id=dataset_id)
        found = await service.list_snapshots(session=session, dataset_id=dataset_id)
    return DatasetSnapshotList(data=[service.snapshot_out(s) for s in found])


@router.get("/datasets/{dataset_id}/snapshots/{snapshot_id}", response_model=DatasetSnapshotOut)
async def get_snapshot(
    dataset_id: str,
    snapshot_id: str,
    d: FilesDeps = Depends(deps),
    project_id: str = Depends(require_project),
) -> DatasetSnapshotOut:
    async with d.sessions() as session:
        await get_dataset(session=session, project_id=project_id, dataset_id=dataset_id)
        snapshot = await session.get(DatasetSnapshot, snapshot_id)
    if snapshot is None or snapshot.dataset_id != dataset_id:
        raise not_found(f"No snapshot with id {snapshot_id!r} on this dataset.", param="snapshot_id")
    return service.snapshot_out(snapshot)
