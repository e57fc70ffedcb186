"""Datasets routes (thin): datasets, their entries and jobs, and the deprecated ``/unstable`` forms.

Every route is scoped to the caller's project; another project's ids are simply not found.
Creating entries checks the request against the published entry schema first (a violation is
one 400, "Input validation failed: entries.<i>.<field>: ..."); rows that pass it but cannot be
entries (say, the last message is not the assistant's) are reported by index, and the others
are created.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.api.datasets import jobs, service
from services.api.datasets.models import Dataset
from services.api.datasets.schemas import (
    ENTRY_FILTER_QUERY,
    DatasetCreate,
    DatasetList,
    DatasetOut,
    DatasetUpdate,
    Deleted,
    EntriesCreate,
    EntriesCreated,
    EntriesDelete,
    EntriesDeleted,
    EntryCreationError,
    EntryCreationErrors,
    EntryList,
    EntryOut,
    EntryUpdate,
    JobList,
    JobOut,
    UnstableDatasetCreate,
    UnstableDatasetDelete,
    UnstableDatasetId,
    UnstableDatasetItem,
    UnstableEntriesCreate,
    UnstableEntriesCreated,
    UnstableEntryError,
    check_entry_rows,
    parse_entry_filters,
)
from services.common.auth import require_project

router = APIRouter(tags=["datasets"])


def sessions(request: Request) -> async_sessionmaker[AsyncSession]:
    return request.app.state.sessions


async def _dataset_out(session: AsyncSession, dataset: Dataset) -> DatasetOut:
    stats = await service.dataset_stats(session=session, dataset_ids=[dataset.id])
    return service.dataset_out(dataset, stats[dataset.id])


async def _add_rows(
    db: async_sessionmaker[AsyncSession], project_id: str, dataset_id: str, rows: list
) -> service.AddResult:
    check_entry_rows(rows)
    async with db.begin() as session:
        dataset = await service.lock_dataset(session=session, project_id=project_id, dataset_id=dataset_id)
        return await service.add_entries(session=session, dataset=dataset, rows=rows, source="api")


# --- datasets --------------------------------------------------------------------------------


@router.get("/datasets", response_model=DatasetList)
async def list_datasets(
    db: async_sessionmaker[AsyncSession] = Depends(sessions), project_id: str = Depends(require_project)
) -> DatasetList:
    async with db() as session:
        datasets = await service.list_datasets(session=session, project_id=project_id)
        stats = await service.dataset_stats(session=session, dataset_ids=[d.id for d in datasets])
    return DatasetList(data=[service.dataset_out(d, stats[d.id]) for d in datasets])


@router.post("/datasets", response_model=DatasetOut)
async def create_dataset(
    body: DatasetCreate,
    db: async_sessionmaker[AsyncSession] = Depends(sessions),
    project_id: str = Depends(require_project),
) -> DatasetOut:
    async with db.begin() as session:
        dataset = await service.create_dataset(session=session, project_id=project_id, name=body.name)
    return service.dataset_out(dataset, service.DatasetStats())


@router.get("/datasets/{dataset_id}", response_model=DatasetOut)
async def get_dataset(
    dataset_id: str,
    db: async_sessionmaker[AsyncSession] = Depends(sessions),
    project_id: str = Depends(require_project),
) -> DatasetOut:
    async with db() as session:
        dataset = await service.get_dataset(session=session, project_id=project_id, dataset_id=dataset_id)
        return await _dataset_out(session, dataset)


@router.patch("/datasets/{dataset_id}", response_model=DatasetOut)
async def update_dataset(
    dataset_id: str,
    body: DatasetUpdate,
    db: async_sessionmaker[AsyncSession] = Depends(sessions),
    project_id: str = Depends(require_project),
) -> DatasetOut:
    async with db.begin() as session:
        dataset = await service.rename_dataset(
            session=session, project_id=project_id, dataset_id=dataset_id, name=body.name
        )
        return await _dataset_out(session, dataset)


@router.delete("/datasets/{dataset_id}", response_model=Deleted)
async def delete_dataset(
    dataset_id: str,
    db: async_sessionmaker[AsyncSession] = Depends(sessions),
    project_id: str = Depends(require_project),
) -> Deleted:
    async with db.begin() as session:
        await service.delete_dataset(session=session, project_id=project_id, dataset_id=dataset_id)
    return Deleted(id=dataset_id, object="dataset")


# --- entries ---------------------------------------------------------------------------------


@router.post("/datasets/{dataset_id}/entries", response_model=EntriesCreated)
async def create_entries(
    dataset_id: str,
    body: EntriesCreate,
    db: async_sessionmaker[AsyncSession] = Depends(sessions),
    project_id: str = Depends(require_project),
) -> EntriesCreated:
    result = await _add_rows(db, project_id, dataset_id, body.entries)
    errors = [EntryCreationError(entry_index=p.index, message=p.message) for p in result.errors]
    return EntriesCreated(
        entries_created=result.created, duplicates=result.duplicates, errors=EntryCreationErrors(data=errors)
    )


@router.get(
    "/datasets/{dataset_id}/entries",
    response_model=EntryList,
    description="List entries, oldest first; also `metadata.<key>=<value>` per metadata pair to match",
    openapi_extra=ENTRY_FILTER_QUERY,
)
async def list_entries(
    dataset_id: str,
    request: Request,
    db: async_sessionmaker[AsyncSession] = Depends(sessions),
    project_id: str = Depends(require_project),
) -> EntryList:
    filters = parse_entry_filters(request.query_params.multi_items())
    async with db() as session:
        dataset = await service.get_dataset(session=session, project_id=project_id, dataset_id=dataset_id)
        entries, has_more = await service.list_entries(session=session, dataset=dataset, filters=filters)
    return EntryList(
        data=[service.entry_out(e) for e in entries],
        has_more=has_more,
        next_cursor=entries[-1].id if has_more and entries else None,
    )


@router.post("/datasets/{dataset_id}/entries/delete", response_model=EntriesDeleted)
async def delete_entries(
    dataset_id: str,
    body: EntriesDelete,
    db: async_sessionmaker[AsyncSession] = Depends(sessions),
    project_id: str = Depends(require_project),
) -> EntriesDeleted:
    async with db.begin() as session:
        dataset = await service.lock_dataset(session=session, project_id=project_id, dataset_id=dataset_id)
        missing = await service.delete_entries(session=session, dataset=dataset, ids=body.ids)
    return EntriesDeleted(deleted=len(set(body.ids)) - len(missing), not_found=missing)


@router.get("/datasets/{dataset_id}/entries/{entry_id}", response_model=EntryOut)
async def get_entry(
    dataset_id: str,
    entry_id: str,
    db: async_sessionmaker[AsyncSession] = Depends(sessions),
    project_id: str = Depends(require_project),
) -> EntryOut:
    async with db() as session:
        dataset = await service.get_dataset(session=session, project_id=project_id, dataset_id=dataset_id)
        entry = await service.get_entry(session=session, dataset=dataset, entry_id=entry_id)
        revisions = await service.entry_revisions(session=session, entry_id=entry.id)
    return service.entry_out(entry, revisions)


@router.patch("/datasets/{dataset_id}/entries/{entry_id}", response_model=EntryOut)
async def update_entry(
    dataset_id: str,
    entry_id: str,
    body: EntryUpdate,
    db: async_sessionmaker[AsyncSession] = Depends(sessions),
    project_id: str = Depends(require_project),
) -> EntryOut:
    async with db.begin() as session:
        dataset = await service.lock_dataset(session=session, project_id=project_id, dataset_id=dataset_id)
        entry = await service.update_entry(session=session, dataset=dataset, entry_id=entry_id, update=body)
        revisions = await service.entry_revisions(session=session, entry_id=entry.id)
    return service.entry_out(entry, revisions)


@router.delete("/datasets/{dataset_id}/entries/{entry_id}", response_model=Deleted)
async def delete_entry(
    dataset_id: str,
    entry_id: str,
    db: async_sessionmaker[AsyncSession] = Depends(sessions),
    project_id: str = Depends(require_project),
) -> Deleted:
    async with db.begin() as session:
        dataset = await service.lock_dataset(session=session, project_id=project_id, dataset_id=dataset_id)
        await service.delete_entry(session=session, dataset=dataset, entry_id=entry_id)
    return Deleted(id=entry_id, object="dataset.entry")


# --- jobs ------------------------------------------------------------------------------------


@router.get("/datasets/{dataset_id}/jobs", response_model=JobList)
async def list_jobs(
    dataset_id: str,
    db: async_sessionmaker[AsyncSession] = Depends(sessions),
    project_id: str = Depends(require_project),
) -> JobList:
    async with db() as session:
        await service.get_dataset(session=session, project_id=project_id, dataset_id=dataset_id)
        found = await jobs.list_jobs(session=session, project_id=project_id, dataset_id=dataset_id)
    return JobList(data=[service.job_out(j) for j in found])


@router.get("/datasets/{dataset_id}/jobs/{job_id}", response_model=JobOut)
async def get_job(
    dataset_id: str,
    job_id: str,
    db: async_sessionmaker[AsyncSession] = Depends(sessions),
    project_id: str = Depends(require_project),
) -> JobOut:
    async with db() as session:
        await service.get_dataset(session=session, project_id=project_id, dataset_id=dataset_id)
        job = await jobs.get_job(session=session, project_id=project_id, dataset_id=dataset_id, job_id=job_id)
    return service.job_out(job)


# --- deprecated: /unstable (camelCase, as older SDK versions call them) ----------------------


@router.post("/unstable/dataset/create", response_model=UnstableDatasetId)
async def unstable_dataset_create(
    body: UnstableDatasetCreate,
    db: async_sessionmaker[AsyncSession] = Depends(sessions),
    project_id: str = Depends(require_project),
) -> UnstableDatasetId:
    async with db.begin() as session:
        dataset = await service.create_dataset(session=session, project_id=project_id, name=body.name)
    return UnstableDatasetId(datasetId=dataset.id)


@router.post("/unstable/dataset/delete", response_model=UnstableDatasetId)
async def unstable_dataset_delete(
    body: UnstableDatasetDelete,
    db: async_sessionmaker[AsyncSession] = Depends(sessions),
    project_id: str = Depends(require_project),
) -> UnstableDatasetId:
    async with db.begin() as session:
        await service.delete_dataset(session=session, project_id=project_id, dataset_id=body.datasetId)
    return UnstableDatasetId(datasetId=body.datasetId)


@router.get("/unstable/dataset/list", response_model=list[UnstableDatasetItem])
async def unstable_dataset_list(
    db: async_sessionmaker[AsyncSession] = Depends(sessions), project_id: str = Depends(require_project)
) -> list[UnstableDatasetItem]:
    async with db() as session:
        datasets = await service.list_datasets(session=session, project_id=project_id)
        stats = await service.dataset_stats(session=session, dataset_ids=[d.id for d in datasets])
    return [service.unstable_dataset_out(d, stats[d.id]) for d in datasets]


@router.post("/unstable/dataset-entry/create", response_model=UnstableEntriesCreated)
async def unstable_dataset_entry_create(
    body: UnstableEntriesCreate,
    db: async_sessionmaker[AsyncSession] = Depends(sessions),
    project_id: str = Depends(require_project),
) -> UnstableEntriesCreated:
    result = await _add_rows(db, project_id, body.datasetId, body.entries)
    return UnstableEntriesCreated(
        createdEntries=result.created,
        errors=[UnstableEntryError(index=p.index, message=p.message) for p in result.errors],
    )
