"""Applying eval events on both catalog databases (SQLite and Postgres): bulk, once per event."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.api.evals import service
from services.api.evals.models import Eval, EvalResult, EvalRowOutput
from services.api.evals.service import apply_events
from services.api.projects import service as projects
from services.api.projects.models import Project
from services.common.clock import now
from services.common.db import make_engine, make_sessionmaker, migrate
from services.common.events import EvalEvent, EvalOutput, EvalScore


def row_event(eval_id: str, project_id: str, entry: str) -> EvalEvent:
    return EvalEvent(
        event_id=f"{eval_id}:{entry}",
        eval_id=eval_id,
        project_id=project_id,
        type="row",
        entry_id=entry,
        outputs=[
            EvalOutput(model="m", output_key=f"key-{entry}", output={"role": "assistant", "content": entry})
        ],
        scores=[
            EvalScore(evaluator="exact", model="m", score=1.0),
            EvalScore(evaluator="h2h", model="m", opponent="original", winner="m", score=1.0, judge_calls=1),
        ],
    )


async def add_eval(sessions: async_sessionmaker[AsyncSession], eval_id: str, *, status: str) -> Project:
    """A new project with one eval of three rows over models ``m`` and ``original``."""
    async with sessions.begin() as session:
        project = await projects.create_project(session=session, name="evals")
        moment = now()
        session.add(
            Eval(
                id=eval_id,
                project_id=project.id,
                dataset_id="ds",
                name="e",
                split="TEST",
                models=["m", "original"],
                evaluators=[],
                status=status,
                progress_done=0,
                progress_total=3,
                estimated_cost={},
                created_at=moment,
                updated_at=moment,
            )
        )
    return project


async def test_events_apply_once_in_bulk(database_url: str) -> None:
    await migrate(database_url)
    engine = make_engine(database_url)
    sessions = make_sessionmaker(engine)
    try:
        project = await add_eval(sessions, "eval_store", status="queued")
        first = [row_event("eval_store", project.id, e) for e in ("a", "b")]
        async with sessions.begin() as session:
            assert await apply_events(session=session, events=first + first[:1]) == 2
        async with sessions.begin() as session:  # a re-delivery and one new row
            applied = await apply_events(
                session=session, events=[*first, row_event("eval_store", project.id, "c")]
            )
            assert applied == 1
        async with sessions() as session:
            record = await session.get(Eval, "eval_store")
            assert record.progress_done == 3 and record.status == "succeeded" and record.finished_at
            results = (await session.execute(EvalResult.__table__.select())).all()
            outputs = (await session.execute(EvalRowOutput.__table__.select())).all()
            assert len(results) == 6 and len(outputs) == 3
        async with sessions.begin() as session:  # a finished eval takes nothing more
            assert await apply_events(session=session, events=[row_event("eval_store", project.id, "d")]) == 0
            assert await apply_events(session=session, events=[row_event("eval_nope", project.id, "a")]) == 0
    finally:
        await engine.dispose()


async def test_a_cancel_waits_for_the_batch_being_applied_then_stands(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The consumer holds the eval's lock from before it reads the status until it commits, on
    SQLite too (where FOR UPDATE does nothing): a cancel arriving meanwhile waits, then stands. (CI
    once saw a cancelled eval back at running: the consumer had read it before the cancel.)"""
    await migrate(database_url)
    engine = make_engine(database_url)
    sessions = make_sessionmaker(engine)
    try:
        project = await add_eval(sessions, "eval_cancel", status="running")

        async def cancel() -> None:
            async with sessions.begin() as other:
                await other.execute(update(Eval).where(Eval.id == "eval_cancel").values(status="cancelled"))

        first_time, cancelling = service._first_time, []

        async def cancel_meanwhile(*args, **kwargs):  # type: ignore[no-untyped-def]
            cancelling.append(asyncio.create_task(cancel()))
            await asyncio.sleep(0.3)
            assert not cancelling[0].done()  # it waits for the consumer's lock
            return await first_time(*args, **kwargs)

        monkeypatch.setattr(service, "_first_time", cancel_meanwhile)
        async with sessions.begin() as session:
            assert (
                await apply_events(session=session, events=[row_event("eval_cancel", project.id, "a")]) == 1
            )
        await cancelling[0]
        async with sessions() as session:
            record = await session.get(Eval, "eval_cancel")
            assert record.status == "cancelled" and record.progress_done == 1
    finally:
        await engine.dispose()
