"""Relabeling datasets: fan the chosen entries out to ``relabel.requests.v1``, apply the results.

The api owns the entries, so the worker gets everything it needs in the request and
reports back by event; applying a result is idempotent (one outcome row per job and
entry) and never overwrites an entry someone changed after the job started.
"""

from __future__ import annotations

from typing import Any

from faststream.kafka import KafkaBroker
from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from services.api.datasets import jobs
from services.api.datasets.models import Dataset, DatasetEntry, DatasetJob
from services.api.datasets.schemas import parse_entry_filters
from services.api.datasets.service import hold_write_lock, list_entries, replace_output
from services.api.relabel.models import RelabelOutcome, RelabelStart
from services.common.clock import now
from services.common.errors import bad_request
from services.common.events import RELABEL_REQUESTS_TOPIC, RelabelItem, RelabelRequest, RelabelResult

BATCH_SIZE = 25
PAGE = 1000


def _filter_params(filters: dict[str, Any]) -> list[tuple[str, str]]:
    params: list[tuple[str, str]] = []
    for name, value in filters.items():
        if name == "metadata" and isinstance(value, dict):
            params += [(f"metadata.{k}", str(v)) for k, v in value.items()]
        elif name in ("limit", "cursor"):
            raise bad_request(f"filters.{name} is not allowed here.", param=f"filters.{name}")
        else:
            params.append((name, str(value)))
    return params


async def chosen_entries(
    *, session: AsyncSession, dataset: Dataset, start: RelabelStart
) -> list[DatasetEntry]:
    if start.entry_ids is not None:
        rows = await session.scalars(
            select(DatasetEntry).where(
                DatasetEntry.dataset_id == dataset.id, DatasetEntry.id.in_(start.entry_ids)
            )
        )
        return list(rows)
    filters = parse_entry_filters([*_filter_params(start.filters), ("limit", str(PAGE))])
    chosen: list[DatasetEntry] = []
    while True:
        page, more = await list_entries(session=session, dataset=dataset, filters=filters)
        chosen += page
        if not more:
            return chosen
        filters.cursor = page[-1].id


def _item(entry: DatasetEntry) -> RelabelItem:
    request: dict[str, Any] = {"messages": entry.messages}
    for key in ("tools", "tool_choice", "response_format"):
        if getattr(entry, key) is not None:
            request[key] = getattr(entry, key)
    return RelabelItem(entry_id=entry.id, base_revision=entry.revision, request=request)


def batches(
    job: DatasetJob, dataset: Dataset, model: str, entries: list[DatasetEntry]
) -> list[RelabelRequest]:
    return [
        RelabelRequest(
            request_id=f"{job.id}:{n}",
            job_id=job.id,
            project_id=job.project_id,
            dataset_id=dataset.id,
            model=model,
            items=[_item(e) for e in entries[start : start + BATCH_SIZE]],
        )
        for n, start in enumerate(range(0, len(entries), BATCH_SIZE))
    ]


async def publish_batches(*, broker: KafkaBroker, requests: list[RelabelRequest]) -> None:
    for request in requests:
        await broker.publish(
            request.model_dump(mode="json"), RELABEL_REQUESTS_TOPIC, key=request.job_id.encode()
        )


def _insert_outcome(session: AsyncSession) -> Any:
    return pg_insert if session.bind.dialect.name == "postgresql" else sqlite_insert


async def apply_result(*, session: AsyncSession, result: RelabelResult) -> bool:
    """Apply one result; False when it was already applied (a re-delivery).

    Holds the dataset's write lock, as a human edit does, before reading the entry's revision:
    an edit committed meanwhile is seen and kept, on SQLite too (where FOR UPDATE does nothing).
    """
    await hold_write_lock(session=session, dataset_id=result.dataset_id)
    job = await session.get(DatasetJob, result.job_id, populate_existing=True)
    if job is None:
        return False  # the dataset (and its jobs) was deleted meanwhile
    entry = await session.get(DatasetEntry, result.entry_id, populate_existing=True)
    status, error = "failed", result.error
    if result.error is None and entry is None:
        status, error = "skipped", "the entry was deleted before its new output arrived"
    elif result.error is None and entry.revision != result.base_revision:
        status, error = "skipped", "the entry changed after the relabel started; kept the newer output"
    elif result.error is None:
        status, error = "relabeled", None
    inserted = await session.execute(
        _insert_outcome(session)(RelabelOutcome)
        .values(job_id=job.id, entry_id=result.entry_id, status=status, error=error, created_at=now())
        .on_conflict_do_nothing()
    )
    if not inserted.rowcount:
        return False
    if status == "relabeled":
        replace_output(
            session,
            entry,
            output=result.output,
            provenance="relabeled_by_model",
            relabel_model=result.model,
            track_rejected=bool(job.params.get("track_rejected")),
        )
    await _update_progress(session, job, result, status, error)
    return True


async def _update_progress(
    session: AsyncSession, job: DatasetJob, result: RelabelResult, status: str, error: str | None
) -> None:
    counts = dict(
        (
            await session.execute(
                select(RelabelOutcome.status, func.count())
                .where(RelabelOutcome.job_id == job.id)
                .group_by(RelabelOutcome.status)
            )
        ).all()
    )
    done = sum(counts.values())
    problems = [{"entry_id": result.entry_id, "message": error}] if status == "failed" else None
    jobs.record_progress(job, done=done, errors=problems, status="running")
    job.result = {
        "relabeled": counts.get("relabeled", 0),
        "failed": counts.get("failed", 0),
        "skipped": counts.get("skipped", 0),
    }
    if job.progress_total is not None and done >= job.progress_total:
        jobs.finish(job)
        if counts.get("relabeled", 0) and job.status == "failed":
            job.status = "partial"
