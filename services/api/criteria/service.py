"""Criteria: versioned CRUD published on ``catalog.v1``, alignment sets and their stats, stored
judgements. Plain keyword-only functions over a session; the long work lives in ``jobs.py``."""

from __future__ import annotations

import random
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from services.api.criteria.models import (
    AlignmentJob,
    AlignmentJudgement,
    AlignmentRow,
    Criterion,
    CriterionVersion,
    Judgement,
)
from services.api.criteria.schemas import (
    AlignmentJobOut,
    AlignmentRowOut,
    AlignmentStats,
    CriterionCreate,
    CriterionOut,
    CriterionUpdate,
    CriterionVersionOut,
    JudgementOut,
    RowJudgement,
)
from services.api.datasets.models import Dataset, DatasetEntry, DatasetJob
from services.api.datasets.rows import EntryError, parse_entry
from services.common.clock import iso, now
from services.common.errors import APIError
from services.common.events import CRITERION_KIND, CatalogRecord, JudgementEvent
from services.common.http import loads_json
from services.common.ids import new_id
from services.judge.criteria import criterion_not_found, parse_criterion_id

MIN_LABELLED = 30
PREFERENCE_JOB = "criteria_preference"  # a dataset job kind
JUDGEMENTS = ("PASS", "FAIL")


def conflict(message: str, *, param: str) -> APIError:
    return APIError(409, message, param=param, code="conflict")


# --- criteria ----------------------------------------------------------------------------------


async def get_criterion(*, session: AsyncSession, project_id: str, name: str) -> Criterion:
    criterion = await session.scalar(
        select(Criterion).where(Criterion.project_id == project_id, Criterion.name == name)
    )
    if criterion is None:
        raise criterion_not_found(name)
    return criterion


async def criterion_versions(*, session: AsyncSession, criterion: Criterion) -> list[CriterionVersion]:
    """Oldest first."""
    return list(
        await session.scalars(
            select(CriterionVersion)
            .where(CriterionVersion.criterion_id == criterion.id)
            .order_by(CriterionVersion.version)
        )
    )


async def resolve(
    *, session: AsyncSession, project_id: str, criterion_id: str
) -> tuple[Criterion, CriterionVersion, list[CriterionVersion]]:
    """``name`` (latest) or ``name@vN``: the criterion, that version and all versions; else 404."""
    name, number = parse_criterion_id(criterion_id)
    criterion = await get_criterion(session=session, project_id=project_id, name=name)
    versions = await criterion_versions(session=session, criterion=criterion)
    wanted = number or criterion.latest_version
    chosen = next((v for v in versions if v.version == wanted), None)
    if chosen is None:
        raise criterion_not_found(criterion_id, f" (it has versions 1 to {criterion.latest_version})")
    return criterion, chosen, versions


async def create_criterion(
    *, session: AsyncSession, project_id: str, body: CriterionCreate
) -> tuple[Criterion, list[CriterionVersion]]:
    existing = await session.scalar(
        select(Criterion.id).where(Criterion.project_id == project_id, Criterion.name == body.name)
    )
    if existing is not None:
        raise conflict(
            f"A criterion named {body.name!r} already exists; PATCH it to make a new version.", param="name"
        )
    moment = now()
    criterion = Criterion(
        id=new_id("crt"),
        project_id=project_id,
        name=body.name,
        latest_version=1,
        created_at=moment,
        updated_at=moment,
    )
    version = CriterionVersion(
        criterion_id=criterion.id,
        version=1,
        model=body.model,
        prompt=body.prompt,
        templated_variables=list(body.templatedVariables),
        created_at=moment,
    )
    session.add_all([criterion, version])
    await session.flush()
    return criterion, [version]


async def update_criterion(
    *, session: AsyncSession, project_id: str, name: str, body: CriterionUpdate
) -> tuple[Criterion, list[CriterionVersion], bool]:
    """A new version when the model, prompt or templated variables change; ``changed`` says so."""
    criterion = await get_criterion(session=session, project_id=project_id, name=name)
    versions = await criterion_versions(session=session, criterion=criterion)
    latest = versions[-1]
    model = body.model if body.model is not None else latest.model
    prompt = body.prompt if body.prompt is not None else latest.prompt
    variables = (
        list(body.templatedVariables) if body.templatedVariables is not None else latest.templated_variables
    )
    if (model, prompt, list(variables)) == (latest.model, latest.prompt, list(latest.templated_variables)):
        return criterion, versions, False
    moment = now()
    version = CriterionVersion(
        criterion_id=criterion.id,
        version=latest.version + 1,
        model=model,
        prompt=prompt,
        templated_variables=variables,
        created_at=moment,
    )
    session.add(version)
    criterion.latest_version = version.version
    criterion.updated_at = moment
    await session.flush()
    return criterion, [*versions, version], True


async def list_criteria(
    *, session: AsyncSession, project_id: str
) -> list[tuple[Criterion, CriterionVersion]]:
    rows = await session.execute(
        select(Criterion, CriterionVersion)
        .join(
            CriterionVersion,
            (CriterionVersion.criterion_id == Criterion.id)
            & (CriterionVersion.version == Criterion.latest_version),
        )
        .where(Criterion.project_id == project_id)
        .order_by(Criterion.name)
    )
    return [(c, v) for c, v in rows.all()]


async def delete_criterion(*, session: AsyncSession, project_id: str, name: str) -> CatalogRecord:
    """The database cascades to versions and the alignment set; stored judgements stay."""
    criterion = await get_criterion(session=session, project_id=project_id, name=name)
    await session.delete(criterion)
    await session.flush()
    return CatalogRecord(kind=CRITERION_KIND, id=f"{project_id}/{name}", deleted=True)


def version_out(name: str, version: CriterionVersion) -> CriterionVersionOut:
    return CriterionVersionOut(
        id=f"{name}@v{version.version}",
        version=version.version,
        model=version.model,
        prompt=version.prompt,
        templatedVariables=list(version.templated_variables),
        created=iso(version.created_at),
    )


def criterion_out(
    criterion: Criterion, version: CriterionVersion, versions: list[CriterionVersion] | None = None
) -> CriterionOut:
    return CriterionOut(
        id=f"{criterion.name}@v{version.version}",
        name=criterion.name,
        version=version.version,
        latestVersion=criterion.latest_version,
        model=version.model,
        prompt=version.prompt,
        templatedVariables=list(version.templated_variables),
        created=iso(criterion.created_at),
        updated=iso(criterion.updated_at),
        versions=[version_out(criterion.name, v) for v in versions] if versions is not None else None,
    )


def criterion_record(criterion: Criterion, versions: Iterable[CriterionVersion]) -> CatalogRecord:
    """Every version in one keyed record, so the judge resolves ``name`` and ``name@vN`` alike."""
    return CatalogRecord(
        kind=CRITERION_KIND,
        id=f"{criterion.project_id}/{criterion.name}",
        data={
            "project_id": criterion.project_id,
            "name": criterion.name,
            "latest": criterion.latest_version,
            "versions": [
                {
                    "version": v.version,
                    "model": v.model,
                    "prompt": v.prompt,
                    "templated_variables": list(v.templated_variables),
                }
                for v in versions
            ],
        },
    )


async def catalog_records(*, session: AsyncSession) -> list[CatalogRecord]:
    """Every criterion, for republication at start-up."""
    criteria = list(await session.scalars(select(Criterion).order_by(Criterion.id)))
    records = []
    for criterion in criteria:
        records.append(
            criterion_record(criterion, await criterion_versions(session=session, criterion=criterion))
        )
    return records


# --- alignment rows ----------------------------------------------------------------------------


def _row(
    criterion: Criterion, row_input: dict[str, Any], output: dict[str, Any], **extra: Any
) -> AlignmentRow:
    moment = now()
    return AlignmentRow(
        id=new_id("alr"),
        criterion_id=criterion.id,
        input=row_input,
        output=output,
        created_at=moment,
        updated_at=moment,
        **extra,
    )


def entry_input(entry: DatasetEntry) -> dict[str, Any]:
    row: dict[str, Any] = {"messages": entry.messages}
    if entry.tools:
        row["tools"] = entry.tools
    if entry.tool_choice is not None:
        row["tool_choice"] = entry.tool_choice
    return row


async def sample_entries(
    *, session: AsyncSession, dataset: Dataset, count: int, seed: int | None
) -> list[DatasetEntry]:
    """``count`` entries picked uniformly at random (all of them when the dataset is smaller)."""
    ids = list(await session.scalars(select(DatasetEntry.id).where(DatasetEntry.dataset_id == dataset.id)))
    chosen = random.Random(seed).sample(ids, min(count, len(ids)))
    if not chosen:
        return []
    entries = await session.scalars(select(DatasetEntry).where(DatasetEntry.id.in_(chosen)))
    return sorted(entries, key=lambda e: chosen.index(e.id))


def add_dataset_rows(
    session: AsyncSession,
    criterion: Criterion,
    entries: list[DatasetEntry],
    outputs: list[dict[str, Any]] | None,
) -> int:
    """Rows with the entries' inputs and their own outputs (or ``outputs``, generated)."""
    for i, entry in enumerate(entries):
        output = outputs[i] if outputs is not None else entry.output
        session.add(_row(criterion, entry_input(entry), output, source="dataset", source_entry_id=entry.id))
    return len(entries)


def add_jsonl_rows(
    session: AsyncSession, criterion: Criterion, body: bytes
) -> tuple[int, list[dict[str, Any]]]:
    """The OpenAI fine-tuning JSONL shape plus an optional ``judgement`` (PASS | FAIL) per line;
    a bad line is reported by its line number and does not sink the others."""
    imported, errors = 0, []
    for number, line in enumerate(body.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = loads_json(line)
            if not isinstance(row, dict):
                raise EntryError("each line must be a JSON object")
            label = row.pop("judgement", None)
            if label is not None and label not in JUDGEMENTS:
                raise EntryError("judgement must be 'PASS' or 'FAIL' when present")
            draft = parse_entry(row)
        except APIError as exc:
            errors.append({"line": number, "message": exc.message})
            continue
        except EntryError as exc:
            errors.append({"line": number, "message": str(exc)})
            continue
        row_input: dict[str, Any] = {"messages": draft.messages}
        if draft.tools:
            row_input["tools"] = draft.tools
        if draft.tool_choice is not None:
            row_input["tool_choice"] = draft.tool_choice
        session.add(_row(criterion, row_input, draft.output, source="upload", human_judgement=label))
        imported += 1
    return imported, errors


async def alignment_rows(*, session: AsyncSession, criterion: Criterion) -> list[AlignmentRow]:
    return list(
        await session.scalars(
            select(AlignmentRow)
            .where(AlignmentRow.criterion_id == criterion.id)
            .order_by(AlignmentRow.created_at, AlignmentRow.id)
        )
    )


async def set_label(
    *, session: AsyncSession, criterion: Criterion, row_id: str, label: str | None
) -> AlignmentRow:
    row = await session.get(AlignmentRow, row_id)
    if row is None or row.criterion_id != criterion.id:
        raise APIError(
            404, f"No alignment row {row_id!r} on this criterion.", type="not_found_error", param="row_id"
        )
    row.human_judgement = label
    row.updated_at = now()
    return row


async def row_judgements(
    *, session: AsyncSession, criterion: Criterion, version: int | None = None
) -> dict[tuple[str, int], AlignmentJudgement]:
    query = (
        select(AlignmentJudgement)
        .join(AlignmentRow, AlignmentRow.id == AlignmentJudgement.row_id)
        .where(AlignmentRow.criterion_id == criterion.id)
    )
    if version is not None:
        query = query.where(AlignmentJudgement.version == version)
    return {(j.row_id, j.version): j for j in await session.scalars(query)}


def row_out(row: AlignmentRow, judgement: AlignmentJudgement | None) -> AlignmentRowOut:
    return AlignmentRowOut(
        id=row.id,
        input=row.input,
        output=row.output,
        humanJudgement=row.human_judgement,
        llmJudgement=RowJudgement(
            version=judgement.version,
            status=judgement.status,
            judgement=judgement.judgement,
            explanation=judgement.explanation,
            errorCode=judgement.error_code,
        )
        if judgement
        else None,
        source=row.source,
        created=iso(row.created_at),
    )


def _insert(session: AsyncSession) -> Any:
    return pg_insert if session.bind.dialect.name == "postgresql" else sqlite_insert


async def store_row_judgement(
    *, session: AsyncSession, row_id: str, version: int, values: dict[str, Any]
) -> None:
    """One verdict per (row, version): a re-run of the same version replaces the old one."""
    insert = _insert(session)(AlignmentJudgement).values(
        row_id=row_id, version=version, created_at=now(), **values
    )
    await session.execute(
        insert.on_conflict_do_update(
            index_elements=["row_id", "version"], set_={**values, "created_at": insert.excluded.created_at}
        )
    )


# --- stats -------------------------------------------------------------------------------------


def _ratio(num: int, den: int) -> float | None:
    return round(num / den, 4) if den else None


def alignment_stats(
    name: str, version: int, labels: list[str | None], verdicts: list[tuple[str, str | None] | None]
) -> AlignmentStats:
    """Per row: the human label (PASS/FAIL/SKIP/None) and this version's verdict ((status,
    judgement) or None when not judged). FAIL is the positive class: precision = TP / (TP + FP),
    recall = TP / (TP + FN), agreement = (TP + TN) / compared."""
    tp = fp = fn = tn = judged = errors = 0
    for label, verdict in zip(labels, verdicts, strict=True):
        if verdict is None:
            continue
        status, judgement = verdict
        if status != "success":
            errors += 1
            continue
        judged += 1
        if label not in JUDGEMENTS:
            continue
        if judgement == "FAIL":
            tp, fp = (tp + 1, fp) if label == "FAIL" else (tp, fp + 1)
        else:
            fn, tn = (fn + 1, tn) if label == "FAIL" else (fn, tn + 1)
    labelled = sum(label in JUDGEMENTS for label in labels)
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    f1 = (
        round(2 * precision * recall / (precision + recall), 4)
        if precision is not None and recall is not None and precision + recall > 0
        else None
    )
    compared = tp + fp + fn + tn
    return AlignmentStats(
        version=version,
        criterionId=f"{name}@v{version}",
        rows=len(labels),
        labelled=labelled,
        skipped=sum(label == "SKIP" for label in labels),
        unlabelled=sum(label is None for label in labels),
        judged=judged,
        judgeErrors=errors,
        compared=compared,
        truePositives=tp,
        falsePositives=fp,
        falseNegatives=fn,
        trueNegatives=tn,
        precision=precision,
        recall=recall,
        f1=f1,
        agreement=_ratio(tp + tn, compared),
        warning=(
            f"Only {labelled} labelled row(s): label at least {MIN_LABELLED} for meaningful stats."
            if labelled < MIN_LABELLED
            else None
        ),
    )


async def stats_by_version(
    *, session: AsyncSession, criterion: Criterion
) -> tuple[list[AlignmentRow], dict[tuple[str, int], AlignmentJudgement], dict[int, AlignmentStats]]:
    rows = await alignment_rows(session=session, criterion=criterion)
    judgements = await row_judgements(session=session, criterion=criterion)
    versions = sorted({v for _, v in judgements} | {criterion.latest_version}, reverse=True)
    labels = [r.human_judgement for r in rows]
    stats = {}
    for version in versions:
        verdicts = [(j.status, j.judgement) if (j := judgements.get((r.id, version))) else None for r in rows]
        stats[version] = alignment_stats(criterion.name, version, labels, verdicts)
    return rows, judgements, stats


# --- jobs and judgements -----------------------------------------------------------------------


def new_job(criterion: Criterion, kind: str, total: int, version: int | None = None) -> AlignmentJob:
    moment = now()
    return AlignmentJob(
        id=new_id("alj"),
        criterion_id=criterion.id,
        kind=kind,
        version=version,
        status="running",
        progress_done=0,
        progress_total=total,
        error_count=0,
        errors=[],
        created_at=moment,
        updated_at=moment,
    )


def job_out(job: AlignmentJob) -> AlignmentJobOut:
    return AlignmentJobOut(
        id=job.id,
        kind=job.kind,
        version=job.version,
        status=job.status,
        progress={"done": job.progress_done, "total": job.progress_total, "errors": job.error_count},
        errors=job.errors or [],
        created=iso(job.created_at),
        updated=iso(job.updated_at),
    )


async def get_job(*, session: AsyncSession, criterion: Criterion, job_id: str) -> AlignmentJob:
    job = await session.get(AlignmentJob, job_id)
    if job is None or job.criterion_id != criterion.id:
        raise APIError(404, f"No job {job_id!r} on this criterion.", type="not_found_error", param="job_id")
    return job


STORE_SLICE = 16


async def store_judgements(*, session: AsyncSession, events: list[JudgementEvent]) -> int:
    """Store verdicts from ``judgements.v1``; ids already stored (a re-delivery) are skipped.
    Returns how many were new. Written in slices of ``STORE_SLICE`` rows, so the requests this
    process serves run between them rather than wait for a whole batch's parameters to be made
    on the event loop (5 ms for 60 verdicts, the judge's tail latency; bench/judge.py)."""
    rows = {
        event.judgement_id: {
            "id": event.judgement_id,
            "project_id": event.project_id,
            "criterion": event.criterion,
            "criterion_version": event.criterion_version,
            "model": event.model,
            "source": event.source[:24],
            "status": event.status,
            "score": event.score,
            "judgement": event.judgement,
            "explanation": event.explanation,
            "error_code": event.error_code[:40] if event.error_code else None,
            "prompt_tokens": event.prompt_tokens,
            "completion_tokens": event.completion_tokens,
            "cost_usd": event.cost_usd,
            "latency_ms": event.latency_ms,
            "created_at": datetime.fromtimestamp(event.created_at / 1000, UTC),
        }
        for event in events
    }
    if not rows:
        return 0
    # One statement, compiled once and cached, run per slice (SQLAlchemy's insertmanyvalues);
    # RETURNING counts what was new, where an executemany's rowcount is -1 on Postgres.
    statement = (
        _insert(session)(Judgement.__table__).on_conflict_do_nothing().returning(Judgement.__table__.c.id)
    )
    values = list(rows.values())
    stored = 0
    for start in range(0, len(values), STORE_SLICE):
        result = await session.execute(statement, values[start : start + STORE_SLICE])
        stored += len(result.all())
    return stored


async def list_judgements(
    *, session: AsyncSession, project_id: str, name: str, limit: int
) -> list[Judgement]:
    return list(
        await session.scalars(
            select(Judgement)
            .where(Judgement.project_id == project_id, Judgement.criterion == name)
            .order_by(Judgement.created_at.desc(), Judgement.id)
            .limit(limit)
        )
    )


def judgement_out(row: Judgement) -> JudgementOut:
    usage: dict[str, Any] = {
        "prompt_tokens": row.prompt_tokens,
        "completion_tokens": row.completion_tokens,
        "total_tokens": row.prompt_tokens + row.completion_tokens,
    }
    if row.cost_usd is not None:
        usage["cost_usd"] = row.cost_usd
    return JudgementOut(
        id=row.id,
        criterionId=f"{row.criterion}@v{row.criterion_version}",
        model=row.model,
        source=row.source,
        status=row.status,
        score=row.score,
        judgement=row.judgement,
        explanation=row.explanation,
        errorCode=row.error_code,
        usage=usage,
        latencyMs=row.latency_ms,
        created=iso(row.created_at),
    )


async def count_rows(*, session: AsyncSession, criterion: Criterion) -> int:
    return int(
        await session.scalar(select(func.count()).where(AlignmentRow.criterion_id == criterion.id)) or 0
    )


async def fail_interrupted_jobs(*, session: AsyncSession) -> int:
    """At start-up: alignment and preference-data jobs a dead api process left running will never
    finish."""
    result = await session.execute(
        update(AlignmentJob)
        .where(AlignmentJob.status.in_(("queued", "running")))
        .values(
            status="failed",
            updated_at=now(),
            errors=[
                {"message": "interrupted: the api process stopped before the job finished; run it again"}
            ],
        )
    )
    preference = await session.execute(
        update(DatasetJob)
        .where(DatasetJob.kind == PREFERENCE_JOB, DatasetJob.status.in_(("queued", "running")))
        .values(
            status="failed",
            updated_at=now(),
            result={"reason": "interrupted: the api process stopped before the job finished; run it again"},
        )
    )
    return (result.rowcount or 0) + (preference.rowcount or 0)
