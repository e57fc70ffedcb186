"""Writers of one dataset take turns on both catalog databases (SQLite and Postgres).

On SQLite ``FOR UPDATE`` does nothing and a read before the first write runs outside any
transaction, so each writer takes the dataset's write lock before it reads what it will change.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.api.datasets import jobs
from services.api.datasets import service as datasets
from services.api.datasets.models import DatasetEntry
from services.api.datasets.schemas import EntryUpdate
from services.api.projects import service as projects
from services.api.pruning import service as pruning
from services.api.relabel.models import RelabelOutcome
from services.api.relabel.service import apply_result
from services.common.db import make_engine, make_sessionmaker, migrate
from services.common.errors import APIError
from services.common.events import RelabelResult

ROW = {
    "messages": [
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ]
}


Sessions = async_sessionmaker[AsyncSession]


@pytest.fixture
async def sessions(database_url: str) -> AsyncIterator[Sessions]:
    """Sessions on a fresh, migrated catalog database (SQLite and Postgres)."""
    await migrate(database_url)
    engine = make_engine(database_url)
    yield make_sessionmaker(engine)
    await engine.dispose()


async def one_entry_dataset(sessions: Sessions) -> tuple[str, str, str]:
    """A new project's dataset with one entry: (project id, dataset id, entry id)."""
    async with sessions.begin() as session:
        project = await projects.create_project(session=session, name="locks")
        dataset = await datasets.create_dataset(session=session, project_id=project.id, name="d")
        added = await datasets.add_entries(session=session, dataset=dataset, rows=[ROW], source="api")
        assert added.created == 1
        entry_id = await session.scalar(select(DatasetEntry.id))
    return project.id, dataset.id, entry_id


async def test_a_relabel_result_never_overwrites_an_edit_committed_while_it_waits(
    sessions: Sessions,
) -> None:
    """The result was asked for at revision 1; a human edit to revision 2 is in flight when it
    arrives. The result waits for the edit's lock, sees revision 2, and is skipped."""
    project_id, dataset_id, entry_id = await one_entry_dataset(sessions)
    async with sessions.begin() as session:
        job = await jobs.create_job(
            session=session, project_id=project_id, dataset_id=dataset_id, kind="relabel", total=1
        )
    result = RelabelResult(
        result_id=f"{job.id}:{entry_id}",
        job_id=job.id,
        project_id=project_id,
        dataset_id=dataset_id,
        entry_id=entry_id,
        base_revision=1,
        model="gpt-4o",
        output={"role": "assistant", "content": "Paris, by the model."},
    )

    async def apply() -> bool:
        async with sessions.begin() as session:
            return await apply_result(session=session, result=result)

    async with sessions.begin() as edit:
        dataset = await datasets.lock_dataset(session=edit, project_id=project_id, dataset_id=dataset_id)
        await datasets.update_entry(
            session=edit,
            dataset=dataset,
            entry_id=entry_id,
            update=EntryUpdate(output={"role": "assistant", "content": "Paris, by a human."}),
        )
        applying = asyncio.create_task(apply())
        await asyncio.sleep(0.3)
        assert not applying.done()  # it waits for the edit's lock
    assert await applying

    async with sessions() as session:
        entry = await session.get(DatasetEntry, entry_id)
        assert entry.output["content"] == "Paris, by a human." and entry.revision == 2
        outcome = await session.scalar(select(RelabelOutcome).where(RelabelOutcome.job_id == job.id))
        assert outcome.status == "skipped" and "changed after the relabel started" in outcome.error


async def test_concurrent_rule_creations_keep_positions_dense(
    sessions: Sessions,
) -> None:
    project_id, dataset_id, _ = await one_entry_dataset(sessions)

    async def create(n: int) -> None:
        async with sessions.begin() as session:
            await pruning.create_rule(
                session=session,
                project_id=project_id,
                dataset_id=dataset_id,
                text=f"rule {n}",
                position=None,
            )

    await asyncio.gather(*(create(n) for n in range(6)))
    async with sessions() as session:
        rules = await pruning.list_rules(session=session, project_id=project_id, dataset_id=dataset_id)
    assert [rule.position for rule in rules] == list(range(6))
    assert sorted(rule.text for rule in rules) == [f"rule {n}" for n in range(6)]


async def test_a_rule_deleted_while_its_update_waits_is_not_found(
    sessions: Sessions,
) -> None:
    """The update read the rule, then waits for the dataset's lock held by a delete; once the
    delete commits, the update reads the rule again under the lock and answers 404, not a write
    to a row that is gone."""
    project_id, dataset_id, _ = await one_entry_dataset(sessions)
    async with sessions.begin() as session:
        rule = await pruning.create_rule(
            session=session, project_id=project_id, dataset_id=dataset_id, text="drop it", position=None
        )

    async def update() -> None:
        async with sessions.begin() as session:
            await pruning.update_rule(session=session, project_id=project_id, rule_id=rule.id, text="x")

    async with sessions.begin() as deleting:
        await pruning.delete_rule(session=deleting, project_id=project_id, rule_id=rule.id)
        updating = asyncio.create_task(update())
        await asyncio.sleep(0.3)
        assert not updating.done()  # it waits for the delete's lock
    with pytest.raises(APIError) as raised:
        await updating
    assert raised.value.status_code == 404
    async with sessions() as session:
        assert await pruning.list_rules(session=session, project_id=project_id, dataset_id=dataset_id) == []
