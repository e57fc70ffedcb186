"""Fine-tuning routes (thin): ``/models`` (OpenPipe), ``/fine_tuning/jobs`` and ``/files`` (OpenAI),
and the deprecated ``/unstable/finetune/*``.

Every write publishes what it must (the TrainingRequest, the model's ``catalog.v1`` record) inside
its transaction, before the commit: a 2xx means the broker has it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from faststream.kafka import KafkaBroker
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.api.fine_tuning import files, openai_provider, service
from services.api.fine_tuning.schemas import (
    CheckpointList,
    EventList,
    FileDeleted,
    FileList,
    FileOut,
    JobCreate,
    JobList,
    JobOut,
    ModelCreate,
    ModelDeleted,
    ModelList,
    ModelOut,
    TrainingConfig,
    UnstableFinetuneCreate,
    UnstableFinetuneDelete,
    UnstableFinetuneDeleted,
    UnstableFinetuneId,
    UnstableFinetuneOut,
)
from services.common.auth import require_project
from services.common.blobstore import BlobStore
from services.common.catalog import CatalogReader
from services.common.clock import iso
from services.common.errors import bad_request, not_found
from services.common.events import CatalogRecord

router = APIRouter(tags=["fine-tuning"])


@dataclass
class Deps:
    request: Request
    sessions: async_sessionmaker[AsyncSession]
    broker: KafkaBroker
    blobs: BlobStore
    publish_timeout: float
    scratch: Path
    local: CatalogReader | None = None  # this process's view of catalog.v1 (router, serving)

    def applied(self, records: list[CatalogRecord]) -> None:
        """After the commit: this process sees its own writes at once (read your writes)."""
        service.apply_locally(self.local, records)


def deps(request: Request) -> Deps:
    state = request.app.state
    return Deps(
        request,
        state.sessions,
        state.broker,
        state.blobs,
        state.publish_timeout,
        state.settings.data_dir / "tmp",
        getattr(state, "catalog", None),
    )


# --- /models -----------------------------------------------------------------------------------


async def _create_model(d: Deps, project_id: str, body: ModelCreate) -> tuple[dict[str, Any], str | None]:
    async with d.sessions.begin() as session:
        if await service.find_model(session=session, project_id=project_id, slug=body.slug) is not None:
            raise service.conflict(
                f"A model with slug {body.slug!r} already exists in this project.", param="slug"
            )
        plan = await service.plan_for_config(
            session=session, project_id=project_id, config=body.training_config, blobs=d.blobs
        )
        rules = await service.pruning_rules_for(
            session=session, project_id=project_id, rule_ids=body.pruning_rule_ids
        )
        if plan.provider == "openai":
            await openai_provider.require_key(d.request.app.state, session=session, project_id=project_id)
        key = await service.dataset_snapshot_key(
            session=session,
            blobs=d.blobs,
            project_id=project_id,
            dataset_id=body.dataset_id,
            rules=rules,
            plan=plan,
            workdir=d.scratch,
            param="datasetId",
        )
        start = service.Start(
            project_id=project_id,
            slug=body.slug,
            dataset_id=body.dataset_id,
            plan=plan,
            training_file=body.dataset_id,
            snapshot_key=key,
            pruning_rule_ids=list(dict.fromkeys(body.pruning_rule_ids)),
            pruning_rules=rules,
            default_temperature=body.default_temperature,
        )
        broker = d.broker if plan.provider == "openpipe" else None
        model, job = await service.start_training(session=session, broker=broker, start=start)
        records = [service.model_record(model, job)]
        await service.publish_records(broker=d.broker, records=records, timeout=d.publish_timeout)
        out = service.model_out(model, job)
    d.applied(records)
    return out, job.id if plan.provider == "openai" else None


@router.post("/models", response_model=ModelOut)
async def create_model(
    body: ModelCreate, d: Deps = Depends(deps), project_id: str = Depends(require_project)
) -> dict[str, Any]:
    out, openai_job = await _create_model(d, project_id, body)
    if openai_job:
        openai_provider.launch(d.request.app.state, openai_job)
    return out


@router.get("/models", response_model=ModelList)
async def list_models(d: Deps = Depends(deps), project_id: str = Depends(require_project)) -> dict[str, Any]:
    async with d.sessions() as session:
        models = await service.list_models(session=session, project_id=project_id)
        jobs = await service.jobs_of(session=session, models=models)
    return {"object": "list", "data": [service.model_out(m, jobs.get(m.job_id or "")) for m in models]}


@router.get("/models/{slug}", response_model=ModelOut)
async def get_model(
    slug: str, d: Deps = Depends(deps), project_id: str = Depends(require_project)
) -> dict[str, Any]:
    async with d.sessions() as session:
        model = await service.get_model(session=session, project_id=project_id, slug=slug)
        jobs = await service.jobs_of(session=session, models=[model])
    return service.model_out(model, jobs.get(model.job_id or ""))


async def _delete_model(d: Deps, project_id: str, slug: str) -> None:
    async with d.sessions.begin() as session:
        records = await service.delete_model(
            session=session, broker=d.broker, project_id=project_id, slug=slug
        )
        await service.publish_records(broker=d.broker, records=records, timeout=d.publish_timeout)
    d.applied(records)


@router.delete("/models/{slug}", response_model=ModelDeleted)
async def delete_model(
    slug: str, d: Deps = Depends(deps), project_id: str = Depends(require_project)
) -> ModelDeleted:
    await _delete_model(d, project_id, slug)
    return ModelDeleted(id=slug)


# --- deprecated /unstable/finetune/* -----------------------------------------------------------


@router.post("/unstable/finetune/create", response_model=UnstableFinetuneId)
async def unstable_finetune_create(
    body: UnstableFinetuneCreate, d: Deps = Depends(deps), project_id: str = Depends(require_project)
) -> UnstableFinetuneId:
    config = TrainingConfig(provider="openpipe", baseModel=body.baseModel, hyperparameters=body.overrides)
    create = ModelCreate(datasetId=body.datasetId, slug=body.slug, trainingConfig=config)
    out, _ = await _create_model(d, project_id, create)
    return UnstableFinetuneId(id=out["id"])


async def _find_for_unstable(session: AsyncSession, project_id: str, id: str | None, slug: str | None) -> Any:
    if not id and not slug:
        raise bad_request("Give the fine-tune's id or slug.", param="id")
    model = await service.find_model(session=session, project_id=project_id, slug=slug or id or "")
    if model is None and id:
        job = await session.get(service.TrainingJob, id)
        if job is not None and job.project_id == project_id:
            model = await service.model_of(session, job)
    if model is None:
        raise not_found(f"No fine-tune {id or slug!r} in this project.", param="id" if id else "slug")
    return model


@router.get("/unstable/finetune/get", response_model=UnstableFinetuneOut)
async def unstable_finetune_get(
    id: str | None = None,
    slug: str | None = None,
    d: Deps = Depends(deps),
    project_id: str = Depends(require_project),
) -> UnstableFinetuneOut:
    async with d.sessions() as session:
        model = await _find_for_unstable(session, project_id, id, slug)
    return UnstableFinetuneOut(
        id=model.slug,
        status=model.status,
        slug=model.slug,
        baseModel=model.base_model,
        errorMessage=model.error_message,
        datasetId=model.dataset_id,
        createdAt=iso(model.created_at),
    )


@router.post("/unstable/finetune/delete", response_model=UnstableFinetuneDeleted)
async def unstable_finetune_delete(
    body: UnstableFinetuneDelete, d: Deps = Depends(deps), project_id: str = Depends(require_project)
) -> UnstableFinetuneDeleted:
    async with d.sessions() as session:
        model = await _find_for_unstable(session, project_id, body.id, body.slug)
    await _delete_model(d, project_id, model.slug)
    return UnstableFinetuneDeleted(deleted="true")


# --- /files ------------------------------------------------------------------------------------


FILE_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "purpose"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "purpose": {"type": "string", "description": "fine-tune"},
                    },
                }
            }
        },
    }
}


@router.post("/files", response_model=FileOut, openapi_extra=FILE_UPLOAD_BODY)
async def create_file(d: Deps = Depends(deps), project_id: str = Depends(require_project)) -> dict[str, Any]:
    """multipart/form-data: ``file`` (the JSONL) and ``purpose`` (``fine-tune``), as the OpenAI SDK sends."""
    try:
        form = await d.request.form()
    except Exception:
        raise bad_request(
            "Send multipart/form-data with the fields 'file' and 'purpose'.", param="file"
        ) from None
    upload, purpose = form.get("file"), form.get("purpose")
    if upload is None or isinstance(upload, str):
        raise bad_request("The field 'file' (a JSONL upload) is required.", param="file")
    if not isinstance(purpose, str) or not purpose:
        raise bad_request("The field 'purpose' is required (use 'fine-tune').", param="purpose")
    data = await upload.read()
    async with d.sessions.begin() as session:
        row = await files.create_file(
            session=session,
            blobs=d.blobs,
            project_id=project_id,
            filename=upload.filename or "upload.jsonl",
            purpose=purpose,
            data=data,
        )
        return files.file_out(row)


@router.get("/files", response_model=FileList)
async def list_files(d: Deps = Depends(deps), project_id: str = Depends(require_project)) -> dict[str, Any]:
    async with d.sessions() as session:
        rows = await files.list_files(session=session, project_id=project_id)
    return {"object": "list", "data": [files.file_out(r) for r in rows], "has_more": False}


@router.get("/files/{file_id}", response_model=FileOut)
async def get_file(
    file_id: str, d: Deps = Depends(deps), project_id: str = Depends(require_project)
) -> dict[str, Any]:
    async with d.sessions() as session:
        return files.file_out(await files.get_file(session=session, project_id=project_id, file_id=file_id))


@router.delete("/files/{file_id}", response_model=FileDeleted)
async def delete_file(
    file_id: str, d: Deps = Depends(deps), project_id: str = Depends(require_project)
) -> FileDeleted:
    async with d.sessions.begin() as session:
        await files.delete_file(session=session, project_id=project_id, file_id=file_id)
    return FileDeleted(id=file_id)


# --- /fine_tuning/jobs -------------------------------------------------------------------------


@router.post("/fine_tuning/jobs", response_model=JobOut)
async def create_job(
    body: JobCreate, d: Deps = Depends(deps), project_id: str = Depends(require_project)
) -> dict:
    async with d.sessions.begin() as session:
        plan = await service.plan_for_job(session=session, project_id=project_id, body=body, blobs=d.blobs)
        if plan.provider == "openai":
            await openai_provider.require_key(d.request.app.state, session=session, project_id=project_id)
        key, rules, failure = await service.training_source(
            session=session,
            blobs=d.blobs,
            project_id=project_id,
            file_or_dataset=body.training_file,
            plan=plan,
            workdir=d.scratch,
            param="training_file",
        )
        validation_key = None
        if body.validation_file and failure is None:
            validation_key, _, failure = await service.training_source(
                session=session,
                blobs=d.blobs,
                project_id=project_id,
                file_or_dataset=body.validation_file,
                plan=plan,
                workdir=d.scratch,
                param="validation_file",
            )
        start = service.Start(
            project_id=project_id,
            slug=service.generated_slug(plan.base_model, body.suffix),
            dataset_id=body.training_file,
            plan=plan,
            training_file=body.training_file,
            snapshot_key=key or "",
            validation_file=body.validation_file,
            validation_key=validation_key,
            pruning_rules=rules,
            suffix=body.suffix,
            seed=body.seed,
            metadata=body.metadata,
            failure=failure,
        )
        broker = d.broker if plan.provider == "openpipe" else None
        model, job = await service.start_training(session=session, broker=broker, start=start)
        records = [service.model_record(model, job)]
        await service.publish_records(broker=d.broker, records=records, timeout=d.publish_timeout)
        out = service.job_out(job)
    d.applied(records)
    if plan.provider == "openai" and failure is None:
        openai_provider.launch(d.request.app.state, job.id)
    return out


@router.get("/fine_tuning/jobs", response_model=JobList)
async def list_jobs(
    request: Request,
    after: str | None = None,
    limit: int = Query(20, ge=1, le=100),
    d: Deps = Depends(deps),
    project_id: str = Depends(require_project),
) -> dict[str, Any]:
    metadata = _metadata_filter(request)
    async with d.sessions() as session:
        jobs, more = await service.list_jobs(
            session=session, project_id=project_id, after=after, limit=limit, metadata=metadata
        )
    return {"object": "list", "data": [service.job_out(j) for j in jobs], "has_more": more}


def _metadata_filter(request: Request) -> dict[str, str]:
    """``metadata[key]=value`` (what the OpenAI SDK sends for ``metadata={...}``)."""
    found = {}
    for name, value in request.query_params.multi_items():
        if name.startswith("metadata[") and name.endswith("]"):
            found[name[len("metadata[") : -1]] = value
        elif name.startswith("metadata."):
            found[name[len("metadata.") :]] = value
    return found


@router.get("/fine_tuning/jobs/{job_id}", response_model=JobOut)
async def get_job(job_id: str, d: Deps = Depends(deps), project_id: str = Depends(require_project)) -> dict:
    async with d.sessions() as session:
        return service.job_out(await service.get_job(session=session, project_id=project_id, job_id=job_id))


@router.get("/fine_tuning/jobs/{job_id}/events", response_model=EventList)
async def list_events(
    job_id: str,
    after: str | None = None,
    limit: int = Query(20, ge=1, le=1000),
    d: Deps = Depends(deps),
    project_id: str = Depends(require_project),
) -> dict[str, Any]:
    async with d.sessions() as session:
        job = await service.get_job(session=session, project_id=project_id, job_id=job_id)
        events, more = await service.list_events(session=session, job=job, after=after, limit=limit)
    return {"object": "list", "data": [service.event_out(e) for e in events], "has_more": more}


@router.get("/fine_tuning/jobs/{job_id}/checkpoints", response_model=CheckpointList)
async def list_checkpoints(
    job_id: str,
    after: str | None = None,
    limit: int = Query(10, ge=1, le=100),
    d: Deps = Depends(deps),
    project_id: str = Depends(require_project),
) -> dict[str, Any]:
    async with d.sessions() as session:
        job = await service.get_job(session=session, project_id=project_id, job_id=job_id)
        rows, more = await service.list_checkpoints(session=session, job=job, after=after, limit=limit)
    data = [service.checkpoint_out(c) for c in rows]
    return {
        "object": "list",
        "data": data,
        "has_more": more,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }


async def _steer(d: Deps, project_id: str, job_id: str, action: str) -> dict[str, Any]:
    async with d.sessions.begin() as session:
        job = await service.get_job(session=session, project_id=project_id, job_id=job_id)
        broker = d.broker if job.provider == "openpipe" else None
        job, records = await service.steer(
            session=session, broker=broker, project_id=project_id, job_id=job_id, action=action
        )
        await service.publish_records(broker=d.broker, records=records, timeout=d.publish_timeout)
        out = service.job_out(job)
    d.applied(records)
    return out


@router.post("/fine_tuning/jobs/{job_id}/cancel", response_model=JobOut)
async def cancel_job(
    job_id: str, d: Deps = Depends(deps), project_id: str = Depends(require_project)
) -> dict:
    return await _steer(d, project_id, job_id, "cancel")


@router.post("/fine_tuning/jobs/{job_id}/pause", response_model=JobOut)
async def pause_job(job_id: str, d: Deps = Depends(deps), project_id: str = Depends(require_project)) -> dict:
    return await _steer(d, project_id, job_id, "pause")


@router.post("/fine_tuning/jobs/{job_id}/resume", response_model=JobOut)
async def resume_job(
    job_id: str, d: Deps = Depends(deps), project_id: str = Depends(require_project)
) -> dict:
    return await _steer(d, project_id, job_id, "resume")
