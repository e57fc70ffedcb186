"""Criteria routes (thin): versioned criteria, alignment sets, stored judgements, preference data.

Every route is scoped to the caller's project. Writes to a criterion publish its ``catalog.v1``
record before the transaction commits (the judge and the router read criteria from there).
``POST /criteria/judge`` belongs to the judge service (``services/judge/fastpath.py``, ``views.py``).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import JSONResponse
from sqlalchemy import select

from services.api.criteria import jobs, service
from services.api.criteria.models import AlignmentJob
from services.api.criteria.schemas import (
    AlignmentJobOut,
    AlignmentRowOut,
    AlignmentSetOut,
    AlignmentStatsList,
    CriterionCreate,
    CriterionDeleted,
    CriterionList,
    CriterionOut,
    CriterionUpdate,
    DatasetImport,
    ImportResult,
    JudgementList,
    LabelUpdate,
    PreferenceStart,
    RunStart,
)
from services.api.datasets import jobs as dataset_jobs
from services.api.datasets.models import DatasetEntry
from services.api.datasets.service import get_dataset, job_out
from services.api.providers.service import publish
from services.common.auth import require_project
from services.common.errors import APIError, bad_request

router = APIRouter(tags=["criteria"])
UPLOAD_PATH = "/criteria/{name}/alignment-set/upload"

NamePath = Annotated[str, Path(min_length=1, max_length=120)]
MAX_JSONL_BYTES = 10 * 1024 * 1024


async def _publish(request: Request, *records) -> None:  # type: ignore[no-untyped-def]
    state = request.app.state
    await publish(broker=state.broker, records=records, timeout=state.publish_timeout)


async def _visible(request: Request) -> None:
    """Read your writes: the next judge or op-criteria call in this process sees the change."""
    await request.app.state.criteria_catalog_sync()


def _workers(request: Request) -> jobs.Workers:
    return request.app.state.criteria_workers


# --- criteria ----------------------------------------------------------------------------------


@router.post("/criteria", response_model=CriterionOut, status_code=201, response_model_exclude_none=True)
async def create_criterion(
    body: CriterionCreate, request: Request, project_id: str = Depends(require_project)
) -> CriterionOut:
    async with request.app.state.sessions.begin() as session:
        criterion, versions = await service.create_criterion(
            session=session, project_id=project_id, body=body
        )
        await _publish(request, service.criterion_record(criterion, versions))
        out = service.criterion_out(criterion, versions[-1], versions)
    await _visible(request)
    return out


@router.get("/criteria", response_model=CriterionList, response_model_exclude_none=True)
async def list_criteria(request: Request, project_id: str = Depends(require_project)) -> CriterionList:
    async with request.app.state.sessions() as session:
        rows = await service.list_criteria(session=session, project_id=project_id)
    return CriterionList(data=[service.criterion_out(c, v) for c, v in rows])


@router.get("/criteria/{criterion_id}", response_model=CriterionOut, response_model_exclude_none=True)
async def get_criterion(
    criterion_id: NamePath, request: Request, project_id: str = Depends(require_project)
) -> CriterionOut:
    """``name``: the latest version with every version listed; ``name@vN``: that version."""
    async with request.app.state.sessions() as session:
        criterion, version, versions = await service.resolve(
            session=session, project_id=project_id, criterion_id=criterion_id
        )
    return service.criterion_out(criterion, version, versions)


@router.patch("/criteria/{name}", response_model=CriterionOut, response_model_exclude_none=True)
async def update_criterion(
    name: NamePath, body: CriterionUpdate, request: Request, project_id: str = Depends(require_project)
) -> CriterionOut:
    """A changed model, prompt or templated variables makes version N+1 (the answer's ``id``)."""
    async with request.app.state.sessions.begin() as session:
        criterion, versions, changed = await service.update_criterion(
            session=session, project_id=project_id, name=name, body=body
        )
        if changed:
            await _publish(request, service.criterion_record(criterion, versions))
        out = service.criterion_out(criterion, versions[-1], versions)
    if changed:
        await _visible(request)
    return out


@router.delete("/criteria/{name}", response_model=CriterionDeleted)
async def delete_criterion(
    name: NamePath, request: Request, project_id: str = Depends(require_project)
) -> CriterionDeleted:
    async with request.app.state.sessions.begin() as session:
        tombstone = await service.delete_criterion(session=session, project_id=project_id, name=name)
        await _publish(request, tombstone)
    await _visible(request)
    return CriterionDeleted(id=name)


@router.get("/criteria/{name}/judgements", response_model=JudgementList)
async def list_judgements(
    name: NamePath,
    request: Request,
    project_id: str = Depends(require_project),
    limit: int = Query(100, ge=1, le=1000),
) -> JudgementList:
    """Stored verdicts (``POST /criteria/judge``, best-of-N, evals, ...), newest first."""
    async with request.app.state.sessions() as session:
        rows = await service.list_judgements(session=session, project_id=project_id, name=name, limit=limit)
    return JudgementList(data=[service.judgement_out(r) for r in rows])


# --- alignment sets ----------------------------------------------------------------------------


@router.post(
    "/criteria/{name}/alignment-set/import", response_model=ImportResult, response_model_exclude_none=True
)
async def import_from_dataset(
    name: NamePath, body: DatasetImport, request: Request, project_id: str = Depends(require_project)
) -> JSONResponse:
    """A random sample of ``count`` dataset entries. Outputs copied: done at once (201). With
    ``outputModel`` the outputs are generated by that model in a job (202, poll ``job.id``)."""
    async with request.app.state.sessions.begin() as session:
        criterion = await service.get_criterion(session=session, project_id=project_id, name=name)
        dataset = await get_dataset(session=session, project_id=project_id, dataset_id=body.datasetId)
        entries = await service.sample_entries(
            session=session, dataset=dataset, count=body.count, seed=body.seed
        )
        if not entries:
            raise bad_request("The dataset has no entries to import.", param="datasetId")
        if body.outputModel is None:
            imported = service.add_dataset_rows(session, criterion, entries, None)
            return JSONResponse(
                ImportResult(imported=imported).model_dump(mode="json", exclude_none=True), 201
            )
        job = service.new_job(criterion, "import", len(entries))
        session.add(job)
        out = ImportResult(imported=0, job=service.job_out(job))
    work = jobs.generate_alignment_rows(
        _workers(request),
        project_id=project_id,
        criterion=criterion,
        entries=entries,
        model=body.outputModel,
        job_id=job.id,
    )
    jobs.in_background(job.id, lambda: work, _crashed(request, job.id))
    return JSONResponse(out.model_dump(mode="json", exclude_none=True), 202)


@router.post(
    UPLOAD_PATH,
    response_model=ImportResult,
    status_code=201,
    response_model_exclude_none=True,
    openapi_extra={
        "requestBody": {"content": {"application/jsonl": {"schema": {"type": "string"}}}, "required": True}
    },
)
async def import_jsonl(
    name: NamePath, request: Request, project_id: str = Depends(require_project)
) -> ImportResult:
    """The body is JSONL (at most 10 MB): OpenAI fine-tuning rows plus an optional ``judgement``
    (PASS | FAIL) each. Bad lines are reported by line number; the others are imported."""
    body = bytearray()
    async for chunk in request.stream():  # exempt from the JSON body limit: capped here instead
        body += chunk
        if len(body) > MAX_JSONL_BYTES:
            raise APIError(413, "Alignment set uploads are limited to 10 MB.", code="request_too_large")
    async with request.app.state.sessions.begin() as session:
        criterion = await service.get_criterion(session=session, project_id=project_id, name=name)
        imported, errors = service.add_jsonl_rows(session, criterion, bytes(body))
        if not imported and errors:
            raise bad_request(
                f"No row could be imported; line {errors[0]['line']}: {errors[0]['message']}", param="body"
            )
    return ImportResult(imported=imported, errors=errors)


@router.get("/criteria/{name}/alignment-set", response_model=AlignmentSetOut)
async def get_alignment_set(
    name: NamePath,
    request: Request,
    project_id: str = Depends(require_project),
    version: int | None = Query(None, ge=1, description="whose judgements to show (default: latest)"),
) -> AlignmentSetOut:
    async with request.app.state.sessions() as session:
        criterion = await service.get_criterion(session=session, project_id=project_id, name=name)
        rows, judgements, stats = await service.stats_by_version(session=session, criterion=criterion)
    shown = version or criterion.latest_version
    if shown not in stats:
        stats[shown] = service.alignment_stats(
            name, shown, [r.human_judgement for r in rows], [None] * len(rows)
        )
    return AlignmentSetOut(
        criterion=name,
        version=shown,
        rows=[service.row_out(r, judgements.get((r.id, shown))) for r in rows],
        stats=stats[shown],
    )


@router.put("/criteria/{name}/alignment-set/rows/{row_id}", response_model=AlignmentRowOut)
async def label_row(
    name: NamePath,
    row_id: str,
    body: LabelUpdate,
    request: Request,
    project_id: str = Depends(require_project),
) -> AlignmentRowOut:
    """The human judgement of one row: PASS, FAIL, SKIP, or null to clear it."""
    async with request.app.state.sessions.begin() as session:
        criterion = await service.get_criterion(session=session, project_id=project_id, name=name)
        row = await service.set_label(
            session=session, criterion=criterion, row_id=row_id, label=body.judgement
        )
        return service.row_out(row, None)


@router.get("/criteria/{name}/alignment-set/stats", response_model=AlignmentStatsList)
async def alignment_stats(
    name: NamePath, request: Request, project_id: str = Depends(require_project)
) -> AlignmentStatsList:
    """Precision, recall (of the FAIL label), F1 and agreement for every judged version, newest
    first: after a prompt change and a new run, the new version's stats sit beside the old."""
    async with request.app.state.sessions() as session:
        criterion = await service.get_criterion(session=session, project_id=project_id, name=name)
        _, _, stats = await service.stats_by_version(session=session, criterion=criterion)
    return AlignmentStatsList(
        criterion=name, latestVersion=criterion.latest_version, versions=list(stats.values())
    )


@router.post("/criteria/{name}/alignment-set/run", response_model=AlignmentJobOut, status_code=202)
async def run_alignment(
    name: NamePath, request: Request, body: RunStart | None = None, project_id: str = Depends(require_project)
) -> AlignmentJobOut:
    """Judge every row with one version (default: latest) in a job; poll the returned job."""
    async with request.app.state.sessions.begin() as session:
        criterion = await service.get_criterion(session=session, project_id=project_id, name=name)
        version = (body.version if body else None) or criterion.latest_version
        if version > criterion.latest_version:
            raise APIError(
                404,
                f"{name} has no version {version}.",
                type="not_found_error",
                param="version",
                code="criterion_not_found",
            )
        total = await service.count_rows(session=session, criterion=criterion)
        if not total:
            raise bad_request("The alignment set is empty: import rows first.", param="name")
        job = service.new_job(criterion, "judge", total, version)
        session.add(job)
        out = service.job_out(job)
    work = jobs.judge_alignment_set(
        _workers(request), project_id=project_id, criterion=criterion, version=version, job_id=job.id
    )
    jobs.in_background(job.id, lambda: work, _crashed(request, job.id))
    return out


@router.get("/criteria/{name}/alignment-set/jobs/{job_id}", response_model=AlignmentJobOut)
async def get_alignment_job(
    name: NamePath, job_id: str, request: Request, project_id: str = Depends(require_project)
) -> AlignmentJobOut:
    async with request.app.state.sessions() as session:
        criterion = await service.get_criterion(session=session, project_id=project_id, name=name)
        return service.job_out(await service.get_job(session=session, criterion=criterion, job_id=job_id))


def _crashed(request: Request, job_id: str):  # type: ignore[no-untyped-def]
    sessions = request.app.state.sessions

    async def mark(exc: Exception) -> None:
        async with sessions.begin() as session:
            job = await session.get(AlignmentJob, job_id)
            if job is not None:
                job.status = "failed"
                job.errors = [*(job.errors or []), {"message": f"internal error: {type(exc).__name__}"}]

    return mark


# --- preference data ---------------------------------------------------------------------------


@router.post("/criteria/preference-data", status_code=202)
async def preference_data(
    body: PreferenceStart, request: Request, project_id: str = Depends(require_project)
) -> JSONResponse:
    """A dataset job (``GET /datasets/{id}/jobs/{job_id}``): K outputs per entry from ``model``,
    each judged by ``criteria``; the best becomes the entry's output and the worst its
    ``rejected_message``. Entries whose outputs all score the same are left unchanged."""
    async with request.app.state.sessions.begin() as session:
        for criterion_id in body.criteria:
            await service.resolve(session=session, project_id=project_id, criterion_id=criterion_id)
        dataset = await get_dataset(session=session, project_id=project_id, dataset_id=body.datasetId)
        query = select(DatasetEntry.id).where(DatasetEntry.dataset_id == dataset.id).order_by(DatasetEntry.id)
        entry_ids = list(await session.scalars(query.limit(body.limit) if body.limit else query))
        if not entry_ids:
            raise bad_request("The dataset has no entries.", param="datasetId")
        job = await dataset_jobs.create_job(
            session=session,
            project_id=project_id,
            dataset_id=dataset.id,
            kind=service.PREFERENCE_JOB,
            total=len(entry_ids),
            params={"model": body.model, "criteria": body.criteria, "k": body.k},
        )
        dataset_jobs.record_progress(job, status="running")
        out = job_out(job)
    work = jobs.preference_data(
        _workers(request),
        project_id=project_id,
        job_id=job.id,
        entry_ids=entry_ids,
        criteria=body.criteria,
        model=body.model,
        k=body.k,
        temperature=body.temperature,
    )
    dataset_jobs.run_in_background(request.app.state.sessions, job.id, lambda: work)
    return JSONResponse(out.model_dump(mode="json"), status_code=202)
