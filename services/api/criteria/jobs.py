"""Long criteria work, run in the api process as background jobs with progress:

- judging an alignment set with one criterion version (the judge's gRPC ``Judge``);
- importing an alignment set whose outputs a model generates (the router's gRPC ``Inference``);
- preference data from criteria: K generations per dataset entry, each judged, best kept as
  the output and worst as the ``rejected_message`` (a dataset job, polled like any other).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.api.criteria import service
from services.api.criteria.models import AlignmentJob, AlignmentRow, Criterion
from services.api.datasets import jobs as dataset_jobs
from services.api.datasets.models import DatasetEntry, DatasetJob
from services.api.datasets.service import replace_output
from services.common.clock import now
from services.common.inference_client import InferenceClient, completion_output
from services.judge.client import JudgeClient

log = logging.getLogger(__name__)

MAX_JOB_ERRORS = 200
_background: set[asyncio.Task] = set()


@dataclass
class Workers:
    sessions: async_sessionmaker[AsyncSession]
    judge: JudgeClient
    inference: InferenceClient
    concurrency: int = 16

    async def close(self) -> None:
        await self.judge.close()
        await self.inference.close()


def in_background(
    name: str, work: Callable[[], Awaitable[None]], on_crash: Callable[[Exception], Awaitable[None]]
) -> None:
    async def guarded() -> None:
        try:
            await work()
        except Exception as exc:
            log.exception("criteria job %s crashed", name)
            await on_crash(exc)

    task = asyncio.create_task(guarded(), name=name)
    _background.add(task)
    task.add_done_callback(_background.discard)


async def _job_progress(
    sessions: async_sessionmaker[AsyncSession], job_id: str, *, error: dict[str, Any] | None = None
) -> None:
    async with sessions.begin() as session:
        values: dict[str, Any] = {"progress_done": AlignmentJob.progress_done + 1, "updated_at": now()}
        if error is not None:
            values["error_count"] = AlignmentJob.error_count + 1
        await session.execute(update(AlignmentJob).where(AlignmentJob.id == job_id).values(**values))
        if error is not None:
            job = await session.get(AlignmentJob, job_id)
            if job is not None and len(job.errors or []) < MAX_JOB_ERRORS:
                job.errors = [*(job.errors or []), error]


async def _finish_job(sessions: async_sessionmaker[AsyncSession], job_id: str, crashed: bool = False) -> None:
    async with sessions.begin() as session:
        job = await session.get(AlignmentJob, job_id)
        if job is None:
            return
        if crashed or (job.error_count and job.error_count >= job.progress_done):
            job.status = "failed"
        else:
            job.status = "partial" if job.error_count else "succeeded"
        job.updated_at = now()


def _rpc_error(exc: grpc.aio.AioRpcError) -> str:
    return f"{exc.code().name}: {exc.details()}"


# --- judging an alignment set -------------------------------------------------------------------


async def judge_alignment_set(
    w: Workers, *, project_id: str, criterion: Criterion, version: int, job_id: str
) -> None:
    async with w.sessions() as session:
        rows = await service.alignment_rows(session=session, criterion=criterion)
    slots = asyncio.Semaphore(w.concurrency)
    criterion_id = f"{criterion.name}@v{version}"

    async def one(row: AlignmentRow) -> None:
        async with slots:
            try:
                verdict = await w.judge.judge(project_id, criterion_id, row.input, row.output, "alignment")
            except grpc.aio.AioRpcError as exc:
                await _job_progress(w.sessions, job_id, error={"row_id": row.id, "message": _rpc_error(exc)})
                return
        values = {
            "status": verdict.status,
            "judgement": verdict.judgement or None,
            "explanation": verdict.explanation if verdict.status == "success" else verdict.error_message,
            "error_code": verdict.error_code or None,
            "model": verdict.model,
            "prompt_tokens": verdict.usage.prompt_tokens,
            "completion_tokens": verdict.usage.completion_tokens,
            "cost_usd": verdict.usage.cost_usd if verdict.usage.HasField("cost_usd") else None,
        }
        async with w.sessions.begin() as session:
            await service.store_row_judgement(session=session, row_id=row.id, version=version, values=values)
        error = None if verdict.status == "success" else {"row_id": row.id, "message": verdict.error_message}
        await _job_progress(w.sessions, job_id, error=error)

    await asyncio.gather(*(one(row) for row in rows))
    await _finish_job(w.sessions, job_id)


# --- importing with generated outputs -----------------------------------------------------------


async def generate_alignment_rows(
    w: Workers, *, project_id: str, criterion: Criterion, entries: list[DatasetEntry], model: str, job_id: str
) -> None:
    slots = asyncio.Semaphore(w.concurrency)

    async def one(entry: DatasetEntry) -> None:
        request = {**service.entry_input(entry), "model": model}
        if entry.response_format:
            request["response_format"] = entry.response_format
        async with slots:
            try:
                output = completion_output(await w.inference.complete(project_id, request))
            except (grpc.aio.AioRpcError, ValueError) as exc:
                message = _rpc_error(exc) if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
                await _job_progress(w.sessions, job_id, error={"entry_id": entry.id, "message": message})
                return
        async with w.sessions.begin() as session:
            service.add_dataset_rows(session, criterion, [entry], [output])
        await _job_progress(w.sessions, job_id)

    await asyncio.gather(*(one(entry) for entry in entries))
    await _finish_job(w.sessions, job_id)


# --- preference data from criteria --------------------------------------------------------------


@dataclass
class Candidate:
    output: dict[str, Any]
    score: float = 0.0


async def _candidates(
    w: Workers, project_id: str, entry: DatasetEntry, model: str, k: int, temperature: float
) -> list[Candidate]:
    request = {**service.entry_input(entry), "model": model, "temperature": temperature}
    if entry.response_format:
        request["response_format"] = entry.response_format
    answers = await asyncio.gather(
        *(w.inference.complete(project_id, request) for _ in range(k)), return_exceptions=True
    )
    candidates = [Candidate(completion_output(a)) for a in answers if isinstance(a, dict)]
    if not candidates:
        first = next(a for a in answers if isinstance(a, BaseException))
        raise ValueError(_rpc_error(first) if isinstance(first, grpc.aio.AioRpcError) else str(first))
    return candidates


async def _score(
    w: Workers, project_id: str, entry: DatasetEntry, candidates: list[Candidate], criteria: list[str]
) -> None:
    """Every candidate by every criterion at once; a candidate's score is the sum of its scores
    (a verdict that failed counts 0)."""
    row_input = service.entry_input(entry)
    pairs = [(c, criterion) for c in candidates for criterion in criteria]
    verdicts = await asyncio.gather(
        *(w.judge.judge(project_id, criterion, row_input, c.output, "preference") for c, criterion in pairs)
    )
    for (candidate, _), verdict in zip(pairs, verdicts, strict=True):
        candidate.score += verdict.score if verdict.status == "success" else 0.0


async def preference_data(
    w: Workers,
    *,
    project_id: str,
    job_id: str,
    entry_ids: list[str],
    criteria: list[str],
    model: str,
    k: int,
    temperature: float,
) -> None:
    slots = asyncio.Semaphore(max(1, w.concurrency // k))
    counts = {"pairs": 0, "ties": 0}
    lock = asyncio.Lock()

    async def one(entry_id: str) -> None:
        async with w.sessions() as session:
            entry = await session.get(DatasetEntry, entry_id)
        if entry is None:
            return await record(None, {"entry_id": entry_id, "message": "the entry was deleted"})
        async with slots:
            try:
                candidates = await _candidates(w, project_id, entry, model, k, temperature)
                await _score(w, project_id, entry, candidates, criteria)
            except (ValueError, grpc.aio.AioRpcError) as exc:
                message = _rpc_error(exc) if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
                return await record(None, {"entry_id": entry_id, "message": message})
        best = max(candidates, key=lambda c: c.score)
        worst = min(candidates, key=lambda c: c.score)
        if best.score == worst.score:
            counts["ties"] += 1
            return await record(None, None)
        async with w.sessions.begin() as session:
            current = await session.get(DatasetEntry, entry_id)
            if current is None or current.revision != entry.revision:
                return await record(
                    None, {"entry_id": entry_id, "message": "the entry changed meanwhile; kept it"}
                )
            replace_output(
                session, current, output=best.output, provenance="relabeled_by_model", relabel_model=model
            )
            current.rejected_message = worst.output
        counts["pairs"] += 1
        await record(entry_id, None)

    async def record(done_id: str | None, error: dict[str, Any] | None) -> None:
        async with lock, w.sessions.begin() as session:
            job = await session.get(DatasetJob, job_id)
            if job is not None:
                dataset_jobs.record_progress(
                    job, done=job.progress_done + 1, errors=[error] if error else None
                )

    await asyncio.gather(*(one(entry_id) for entry_id in entry_ids))
    async with w.sessions.begin() as session:
        job = await session.get(DatasetJob, job_id)
        if job is not None:
            dataset_jobs.finish(
                job, result={"preference_pairs": counts["pairs"], "ties_skipped": counts["ties"]}
            )
