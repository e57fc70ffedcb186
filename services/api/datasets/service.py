"""Datasets and entries: plain keyword-only functions over a session.

``add_entries`` is the one way rows become entries (API, upload, log import): it
validates each row on its own, reports bad rows by index, skips duplicates, and inserts
the rest in bulk.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from services.api.datasets.models import Dataset, DatasetEntry
from services.api.datasets.rows import EntryDraft, EntryError, parse_entry
from services.common.errors import not_found


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(10)}"


def now() -> datetime:
    return datetime.now(UTC)


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
    entry_ids: list[str] = field(default_factory=list)


def draft_values(
    draft: EntryDraft,
    *,
    dataset_id: str,
    source: str,
    source_log_id: str | None = None,
    provenance: str | None = None,
    moment: datetime | None = None,
) -> dict[str, Any]:
    moment = moment or now()
    return {
        "id": new_id("dse"),
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
    known = await existing_hashes(
        session=session, dataset_id=dataset.id, hashes=[d.content_hash for _, d in drafts]
    )
    moment = now()
    values = []
    for _, draft in drafts:
        if draft.content_hash in known:
            result.duplicates += 1
            continue
        known.add(draft.content_hash)
        values.append(draft_values(draft, dataset_id=dataset.id, source=source, moment=moment))
    if values:
        await session.execute(insert(DatasetEntry), values)
        dataset.updated_at = moment
    result.created = len(values)
    result.entry_ids = [v["id"] for v in values]
    return result
