"""Datasets and entries: plain keyword-only functions over a session.

``insert_entries`` is the one way entries are written (API adds, uploads, log imports), with one
duplicate rule: a row is skipped when the dataset already holds the same thing, which for a row
made from a request log is that log (``source_log_id``: a log imported twice) and for any other
row its content (input and output, ``content_hash``: the same example sent twice); every writer
reports the skipped rows as duplicates. ``add_entries`` validates rows on their
own, reports bad rows by index and inserts the valid ones through it. ``replace_output`` is the
one way an entry's output changes (human edit, relabel): the replaced output is kept as a
``DatasetEntryRevision``.

Every function that takes a ``project_id`` scopes to it: another project's ids are not found.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Text, and_, case, cast, delete, exists, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from services.api.datasets.bulk import (
    CONTENT_HASH,
    PLACEHOLDER_MOMENT,
    SOURCE_LOG_ID,
    EntryRow,
    bulk_insert_for,
    driver_moment,
    entry_row,
)
from services.api.datasets.models import Dataset, DatasetEntry, DatasetEntryRevision, DatasetJob
from services.api.datasets.rows import (
    EntryDraft,
    EntryError,
    content_hash,
    estimate_tokens,
    parse_entry,
)
from services.api.datasets.schemas import (
    DatasetOut,
    EntryFilters,
    EntryOut,
    EntryUpdate,
    JobOut,
    JobProgress,
    RevisionOut,
    UnstableDatasetItem,
)
from services.api.fine_tuning.models import FineTunedModel
from services.common.clock import iso, now
from services.common.db import hold_row_lock
from services.common.errors import bad_request, not_found
from services.common.ids import new_id


def entry_ids() -> Iterator[str]:
    """Entry ids in the usual shape (``dse_`` + 20 hex) but increasing: milliseconds, a sequence
    number and a per-call salt. Appending to the primary-key index instead of inserting at random
    places keeps large imports from slowing down as the table grows (and skips a system call per
    id). Past 65,536 ids from one call they are random again."""
    prefix = f"dse_{time.time_ns() // 1_000_000 & 0xFFFFFFFFFFF:011x}"
    salt = secrets.randbits(20)
    for sequence in range(0x10000):
        yield f"{prefix}{sequence:04x}{salt:05x}"
    yield from iter(lambda: new_id("dse"), None)


async def get_dataset(*, session: AsyncSession, project_id: str, dataset_id: str) -> Dataset:
    """The project's dataset, or a 404 (another project's id is indistinguishable from a missing one)."""
    dataset = await session.get(Dataset, dataset_id)
    if dataset is None or dataset.project_id != project_id:
        raise not_found(f"No dataset with id {dataset_id!r} in this project.", param="dataset_id")
    return dataset


@dataclass
class RowProblem:
    index: int
    message: str


@dataclass
class AddResult:
    created: int = 0
    duplicates: int = 0
    errors: list[RowProblem] = field(default_factory=list)


@dataclass
class Inserted:
    created: int = 0
    duplicates: int = 0


def draft_values(
    draft: EntryDraft,
    *,
    dataset_id: str,
    source: str,
    source_log_id: str | None = None,
    provenance: str | None = None,
    entry_id: str,
    moment: datetime | None = None,
) -> dict[str, Any]:
    moment = moment or now()
    return {
        "id": entry_id,
        "dataset_id": dataset_id,
        "content_hash": draft.content_hash,
        "split": draft.split,
        "messages": draft.messages,
        "tools": draft.tools,
        "tool_choice": draft.tool_choice,
        "response_format": draft.response_format,
        "output": draft.output,
        "rejected_message": draft.rejected_message,
        "entry_metadata": draft.metadata,
        "source": source,
        "source_log_id": source_log_id,
        "provenance": provenance or source,
        "relabel_model": None,
        "revision": 1,
        "prompt_tokens": draft.prompt_tokens,
        "output_tokens": draft.output_tokens,
        "created_at": moment,
        "updated_at": moment,
    }


async def existing_hashes(*, session: AsyncSession, dataset_id: str, hashes: list[str]) -> set[str]:
    found: set[str] = set()
    for start in range(0, len(hashes), 500):
        chunk = hashes[start : start + 500]
        rows = await session.scalars(
            select(DatasetEntry.content_hash).where(
                DatasetEntry.dataset_id == dataset_id, DatasetEntry.content_hash.in_(chunk)
            )
        )
        found.update(rows)
    return found


async def add_entries(
    *, session: AsyncSession, dataset: Dataset, rows: list[Any], source: str, first_index: int = 0
) -> AddResult:
    """Validate every row; insert the valid, new ones in bulk. Never raises for a bad row."""
    result = AddResult()
    drafts: list[tuple[int, EntryDraft]] = []
    for offset, row in enumerate(rows):
        try:
            drafts.append((first_index + offset, parse_entry(row)))
        except EntryError as exc:
            result.errors.append(RowProblem(first_index + offset, str(exc)))
    connection = await session.connection()
    moment, ids = driver_moment(connection.dialect, now()), entry_ids()
    rows = [
        entry_row(
            draft_values(
                draft, dataset_id=dataset.id, source=source, entry_id=next(ids), moment=PLACEHOLDER_MOMENT
            ),
            moment,
        )
        for _, draft in drafts
    ]
    inserted = await insert_entries(session=session, dataset=dataset, rows=rows)
    result.created, result.duplicates = inserted.created, inserted.duplicates
    return result


async def insert_entries(*, session: AsyncSession, dataset: Dataset, rows: list[EntryRow]) -> Inserted:
    """Insert the rows that are not duplicates (see the module's docstring); count the others.

    A log's row is checked by the table's unique ``(dataset_id, source_log_id)`` (``ON CONFLICT DO
    NOTHING``, so concurrent imports are safe); any other row by its content hash, for which the
    caller holds the dataset's write lock (``lock_dataset``/``hold_write_lock``) so that the check
    sees what concurrent writers committed. Distinct logs with equal content stay distinct entries.
    """
    by_content = [row for row in rows if row[SOURCE_LOG_ID] is None]
    known = await existing_hashes(
        session=session, dataset_id=dataset.id, hashes=list({row[CONTENT_HASH] for row in by_content})
    )
    fresh = []
    for row in rows:
        if row[SOURCE_LOG_ID] is None:
            if row[CONTENT_HASH] in known:
                continue
            known.add(row[CONTENT_HASH])
        fresh.append(row)
    connection = await session.connection()
    created = await bulk_insert_for(connection.dialect).insert(connection, fresh) if fresh else 0
    if created:
        dataset.updated_at = now()
    return Inserted(created=created, duplicates=len(rows) - created)


# --- datasets --------------------------------------------------------------------------------


async def create_dataset(*, session: AsyncSession, project_id: str, name: str) -> Dataset:
    moment = now()
    dataset = Dataset(id=new_id("ds"), project_id=project_id, name=name, created_at=moment, updated_at=moment)
    session.add(dataset)
    await session.flush()
    return dataset


async def list_datasets(*, session: AsyncSession, project_id: str) -> list[Dataset]:
    """Newest first."""
    return list(
        await session.scalars(
            select(Dataset)
            .where(Dataset.project_id == project_id)
            .order_by(Dataset.created_at.desc(), Dataset.id.desc())
        )
    )


async def rename_dataset(*, session: AsyncSession, project_id: str, dataset_id: str, name: str) -> Dataset:
    dataset = await get_dataset(session=session, project_id=project_id, dataset_id=dataset_id)
    if dataset.name != name:
        dataset.name = name
        dataset.updated_at = now()
    return dataset


async def delete_dataset(*, session: AsyncSession, project_id: str, dataset_id: str) -> None:
    """The database cascades to entries, revisions, pruning rules, jobs and snapshot rows."""
    dataset = await get_dataset(session=session, project_id=project_id, dataset_id=dataset_id)
    await session.delete(dataset)
    await session.flush()


async def lock_dataset(*, session: AsyncSession, project_id: str, dataset_id: str) -> Dataset:
    """``get_dataset``, then hold the dataset's write lock until the transaction ends.

    A no-op UPDATE takes the row lock on Postgres and the write lock on SQLite, so concurrent
    writers of one dataset (two uploads of the same rows) run one after the other and the
    duplicate check of ``add_entries`` sees the rows the other one committed.
    """
    dataset = await get_dataset(session=session, project_id=project_id, dataset_id=dataset_id)
    await hold_write_lock(session=session, dataset_id=dataset.id)
    return dataset


async def hold_write_lock(*, session: AsyncSession, dataset_id: str) -> None:
    await hold_row_lock(session, Dataset, dataset_id)


def touch(dataset: Dataset, moment: datetime | None = None) -> None:
    dataset.updated_at = moment or now()


@dataclass
class DatasetStats:
    entries: int = 0
    train: int = 0
    test: int = 0
    preference: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    fine_tunes: int = 0

    @property
    def sft(self) -> int:
        return self.entries - self.preference


def has_rejected_message() -> Any:
    """SQL: the entry has a rejected output. ``None`` is stored as JSON ``null``, not SQL NULL."""
    column = DatasetEntry.rejected_message
    return and_(column.is_not(None), cast(column, Text) != "null")


async def fine_tune_counts(*, session: AsyncSession, dataset_ids: list[str]) -> dict[str, int]:
    """Fine-tuned models trained (or training) on each dataset."""
    if not dataset_ids:
        return {}
    query = (
        select(FineTunedModel.dataset_id, func.count())
        .where(FineTunedModel.dataset_id.in_(dataset_ids))
        .group_by(FineTunedModel.dataset_id)
    )
    return {dataset_id: int(count) for dataset_id, count in await session.execute(query)}


async def dataset_stats(*, session: AsyncSession, dataset_ids: list[str]) -> dict[str, DatasetStats]:
    """Entry counts (total, per split, SFT vs preference) and token totals, one query for all."""
    stats = {dataset_id: DatasetStats() for dataset_id in dataset_ids}
    if not dataset_ids:
        return stats
    one = case((has_rejected_message(), 1), else_=0)
    query = (
        select(
            DatasetEntry.dataset_id,
            func.count(),
            func.sum(case((DatasetEntry.split == "TRAIN", 1), else_=0)),
            func.sum(case((DatasetEntry.split == "TEST", 1), else_=0)),
            func.sum(one),
            func.sum(DatasetEntry.prompt_tokens),
            func.sum(DatasetEntry.output_tokens),
        )
        .where(DatasetEntry.dataset_id.in_(dataset_ids))
        .group_by(DatasetEntry.dataset_id)
    )
    for dataset_id, total, train, test, preference, prompt, output in await session.execute(query):
        stats[dataset_id] = DatasetStats(
            int(total),
            int(train or 0),
            int(test or 0),
            int(preference or 0),
            int(prompt or 0),
            int(output or 0),
        )
    for dataset_id, count in (await fine_tune_counts(session=session, dataset_ids=dataset_ids)).items():
        stats[dataset_id].fine_tunes = count
    return stats


def dataset_out(dataset: Dataset, stats: DatasetStats) -> DatasetOut:
    return DatasetOut(
        id=dataset.id,
        name=dataset.name,
        created=iso(dataset.created_at),
        updated=iso(dataset.updated_at),
        dataset_entry_count=stats.entries,
        fine_tune_count=stats.fine_tunes,
        train_entry_count=stats.train,
        test_entry_count=stats.test,
        sft_entry_count=stats.sft,
        preference_entry_count=stats.preference,
        prompt_tokens=stats.prompt_tokens,
        output_tokens=stats.output_tokens,
    )


def unstable_dataset_out(dataset: Dataset, stats: DatasetStats) -> UnstableDatasetItem:
    return UnstableDatasetItem(
        id=dataset.id,
        name=dataset.name,
        createdAt=iso(dataset.created_at),
        updatedAt=iso(dataset.updated_at),
        datasetEntryCount=stats.entries,
        fineTuneCount=stats.fine_tunes,
    )


# --- entries ---------------------------------------------------------------------------------


async def get_entry(*, session: AsyncSession, dataset: Dataset, entry_id: str) -> DatasetEntry:
    entry = await session.get(DatasetEntry, entry_id)
    if entry is None or entry.dataset_id != dataset.id:
        raise not_found(f"No entry with id {entry_id!r} in this dataset.", param="entry_id")
    return entry


async def entry_revisions(*, session: AsyncSession, entry_id: str) -> list[DatasetEntryRevision]:
    """The outputs the entry had before, oldest first."""
    return list(
        await session.scalars(
            select(DatasetEntryRevision)
            .where(DatasetEntryRevision.entry_id == entry_id)
            .order_by(DatasetEntryRevision.revision, DatasetEntryRevision.created_at)
        )
    )


_SKIPPED_KEYS = frozenset({"role", "type", "id", "tool_call_id"})


def _texts(value: Any) -> Iterable[str]:
    """Every human-readable string in messages (content, parts, tool call names and arguments)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _texts(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            if key not in _SKIPPED_KEYS:
                yield from _texts(item)


def entry_mentions(entry: DatasetEntry, needle: str) -> bool:
    folded = needle.casefold()
    return any(folded in text.casefold() for text in _texts([entry.messages, entry.output]))


def _search_prefilter(needle: str) -> Any:
    """A cheap SQL superset of ``entry_mentions``: the longest ASCII run of the needle, JSON-escaped
    the way stored JSON is (non-ASCII may be stored as ``\\uXXXX``, so it cannot be matched in SQL)."""
    pieces = [p for p in re.split(r"[^\x00-\x7f]+", needle.lower()) if p]
    if not pieces:
        return None
    piece = json.dumps(max(pieces, key=len))[1:-1]
    return or_(
        func.lower(cast(DatasetEntry.messages, Text)).contains(piece, autoescape=True),
        func.lower(cast(DatasetEntry.output, Text)).contains(piece, autoescape=True),
    )


def _metadata_equals(session: AsyncSession, key: str, value: str) -> Any:
    """SQL: ``metadata[key] == value``. SQLite's JSON paths cannot quote a key holding ``"``, so
    there the key is matched as a value of ``json_each`` instead of spelled into a path."""
    if session.bind.dialect.name == "sqlite":
        pairs = func.json_each(DatasetEntry.entry_metadata).table_valued("key", "value")
        return exists(select(1).select_from(pairs).where(pairs.c.key == key, pairs.c.value == value))
    return DatasetEntry.entry_metadata[key].as_string() == value


def _after(entry_id: str) -> Any:
    """Entries after ``entry_id`` in the listing order (created_at, id)."""
    created = select(DatasetEntry.created_at).where(DatasetEntry.id == entry_id).scalar_subquery()
    return or_(
        DatasetEntry.created_at > created,
        and_(DatasetEntry.created_at == created, DatasetEntry.id > entry_id),
    )


async def list_entries(
    *, session: AsyncSession, dataset: Dataset, filters: EntryFilters
) -> tuple[list[DatasetEntry], bool]:
    """One page of entries in a stable order (created_at, id) after ``filters.cursor``; and whether
    more follow. ``search`` is case-insensitive over the text of the messages and the output."""
    if filters.cursor is not None:
        known = await session.scalar(
            select(DatasetEntry.id).where(
                DatasetEntry.id == filters.cursor, DatasetEntry.dataset_id == dataset.id
            )
        )
        if known is None:
            raise bad_request(
                f"Unknown cursor {filters.cursor!r}: pass the id of the last entry of the previous page.",
                param="cursor",
            )
    conditions: list[Any] = [DatasetEntry.dataset_id == dataset.id]
    if filters.split:
        conditions.append(DatasetEntry.split == filters.split)
    if filters.provenance:
        conditions.append(DatasetEntry.provenance == filters.provenance)
    if filters.source:
        conditions.append(DatasetEntry.source == filters.source)
    for key, value in filters.metadata.items():
        conditions.append(_metadata_equals(session, key, value))
    if filters.search:
        prefilter = _search_prefilter(filters.search)
        if prefilter is not None:
            conditions.append(prefilter)
    base = select(DatasetEntry).where(*conditions).order_by(DatasetEntry.created_at, DatasetEntry.id)
    wanted = filters.limit + 1
    if not filters.search:
        query = base.where(_after(filters.cursor)) if filters.cursor else base
        rows = list(await session.scalars(query.limit(wanted)))
        return rows[: filters.limit], len(rows) > filters.limit
    # The SQL prefilter may also match JSON keys and roles: confirm each candidate, batch by batch.
    found: list[DatasetEntry] = []
    position, batch = filters.cursor, max(wanted, 500)
    while len(found) < wanted:
        query = base.where(_after(position)) if position else base
        rows = list(await session.scalars(query.limit(batch)))
        found += [row for row in rows if entry_mentions(row, filters.search)]
        if len(rows) < batch:
            break
        position = rows[-1].id
    return found[: filters.limit], len(found) > filters.limit


def entry_out(entry: DatasetEntry, revisions: list[DatasetEntryRevision] | None = None) -> EntryOut:
    return EntryOut(
        id=entry.id,
        dataset_id=entry.dataset_id,
        messages=[*entry.messages, entry.output],
        output=entry.output,
        rejected_message=entry.rejected_message,
        tools=entry.tools,
        tool_choice=entry.tool_choice,
        response_format=entry.response_format,
        split=entry.split,
        metadata=entry.entry_metadata or {},
        provenance=entry.provenance,
        source=entry.source,
        source_log_id=entry.source_log_id,
        relabel_model=entry.relabel_model,
        revision=entry.revision,
        prompt_tokens=entry.prompt_tokens,
        output_tokens=entry.output_tokens,
        created=iso(entry.created_at),
        updated=iso(entry.updated_at),
        revisions=None
        if revisions is None
        else [
            RevisionOut(
                revision=r.revision,
                output=r.output,
                rejected_message=r.rejected_message,
                provenance=r.provenance,
                relabel_model=r.relabel_model,
                created=iso(r.created_at),
            )
            for r in revisions
        ],
    )


def replace_output(
    session: AsyncSession,
    entry: DatasetEntry,
    *,
    output: dict[str, Any],
    provenance: str,
    relabel_model: str | None = None,
    track_rejected: bool = False,
    moment: datetime | None = None,
) -> DatasetEntryRevision:
    """Give ``entry`` a new output (a normalized assistant message), keeping the old one as a
    revision; with ``track_rejected`` the old output also becomes the entry's ``rejected_message``
    (a preference pair). Bumps ``revision``; recomputes the hash and output tokens; keeps the split."""
    moment = moment or now()
    revision = DatasetEntryRevision(
        id=new_id("dsr"),
        entry_id=entry.id,
        revision=entry.revision,
        output=entry.output,
        rejected_message=entry.rejected_message,
        provenance=entry.provenance,
        relabel_model=entry.relabel_model,
        created_at=moment,
    )
    session.add(revision)
    if track_rejected:
        entry.rejected_message = entry.output
    entry.output = output
    entry.provenance = provenance
    entry.relabel_model = relabel_model
    entry.revision = entry.revision + 1
    entry.output_tokens = estimate_tokens(output)
    entry.content_hash = content_hash(
        entry.messages, entry.tools, entry.tool_choice, entry.response_format, output
    )
    entry.updated_at = moment
    return revision


async def update_entry(
    *, session: AsyncSession, dataset: Dataset, entry_id: str, update: EntryUpdate
) -> DatasetEntry:
    """A human edit: split, metadata (merged; ``None`` removes a key), rejected_message, and the
    output (``output``, or ``messages`` replacing the whole conversation) as a human relabel."""
    entry = await get_entry(session=session, dataset=dataset, entry_id=entry_id)
    given = update.model_fields_set
    if update.output is not None and update.messages is not None:
        raise bad_request("Send either output or messages, not both.", param="output")
    if update.track_rejected and "rejected_message" in given:
        raise bad_request("Send either track_rejected or rejected_message, not both.", param="track_rejected")
    if update.track_rejected and update.output is None and update.messages is None:
        raise bad_request("track_rejected needs a new output (output or messages).", param="track_rejected")
    moment = now()
    if update.output is not None or update.messages is not None or "rejected_message" in given:
        if update.messages is not None:
            messages, param = [m.model_dump(exclude_unset=True) for m in update.messages], "messages"
        elif update.output is not None:
            messages, param = [*entry.messages, update.output.model_dump(exclude_unset=True)], "output"
        else:
            messages, param = [*entry.messages, entry.output], "rejected_message"
        rejected = entry.rejected_message
        if "rejected_message" in given:
            rejected = (
                None
                if update.rejected_message is None
                else update.rejected_message.model_dump(exclude_unset=True)
            )
        row = {
            "messages": messages,
            "tools": entry.tools,
            "tool_choice": entry.tool_choice,
            "response_format": entry.response_format,
            "rejected_message": rejected,
        }
        try:
            draft = parse_entry(row)
        except EntryError as exc:
            raise bad_request(str(exc), param=param) from None
        if update.track_rejected and draft.output == entry.output:
            raise bad_request("track_rejected needs an output different from the current one.", param=param)
        if "rejected_message" in given:
            entry.rejected_message = draft.rejected_message
        entry.messages = draft.messages
        entry.prompt_tokens = draft.prompt_tokens
        if draft.output != entry.output:
            replace_output(
                session,
                entry,
                output=draft.output,
                provenance="relabeled_by_human",
                track_rejected=update.track_rejected,
                moment=moment,
            )
        entry.content_hash = content_hash(
            entry.messages, entry.tools, entry.tool_choice, entry.response_format, entry.output
        )
    if update.split is not None:
        entry.split = update.split
    if update.metadata is not None:
        merged = dict(entry.entry_metadata or {})
        for key, value in update.metadata.items():
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = value
        entry.entry_metadata = merged
    entry.updated_at = moment
    touch(dataset, moment)
    await session.flush()
    return entry


async def delete_entry(*, session: AsyncSession, dataset: Dataset, entry_id: str) -> None:
    """Its revisions go with it (the database cascades)."""
    entry = await get_entry(session=session, dataset=dataset, entry_id=entry_id)
    await session.delete(entry)
    touch(dataset)
    await session.flush()


async def delete_entries(*, session: AsyncSession, dataset: Dataset, ids: list[str]) -> list[str]:
    """Delete the dataset's entries among ``ids``; returns the ids that were not found in it."""
    wanted = list(dict.fromkeys(ids))
    deleted: set[str] = set()
    for start in range(0, len(wanted), 500):
        chunk = wanted[start : start + 500]
        found = set(
            await session.scalars(
                select(DatasetEntry.id).where(
                    DatasetEntry.dataset_id == dataset.id, DatasetEntry.id.in_(chunk)
                )
            )
        )
        if found:
            await session.execute(
                delete(DatasetEntry)
                .where(DatasetEntry.dataset_id == dataset.id, DatasetEntry.id.in_(found))
                .execution_options(synchronize_session=False)
            )
        deleted |= found
    if deleted:
        touch(dataset)
    return [i for i in wanted if i not in deleted]


# --- jobs ------------------------------------------------------------------------------------


def job_out(job: DatasetJob) -> JobOut:
    return JobOut(
        id=job.id,
        kind=job.kind,
        status=job.status,
        progress=JobProgress(done=job.progress_done, total=job.progress_total),
        errors=job.errors or [],
        error_count=job.error_count,
        result=job.result or {},
        created=iso(job.created_at),
        updated=iso(job.updated_at),
    )
