"""Dataset files: the upload job, exports and snapshots, as plain functions over a session and a blob store.

- Upload: the spooled JSONL goes to ``uploads/<project>/<dataset>/<job id>.jsonl``; a ``DatasetJob``
  (kind ``upload``) reads it back line by line and adds entries in batches, committing progress
  (lines done / total) with each batch. Bad lines are reported as ``line N: ...`` and never sink
  the file.
- Export: a ``DatasetJob`` (kind ``export``) writes every entry as one ``to_training_row`` line at
  ``exports/<project>/<dataset>/<ts>.jsonl``, reading in primary-key order (sequential reads) and
  committing progress about once a second; uploading that file again gives the same dataset.
- Snapshot: the dataset with its pruning rules applied, frozen as an immutable, content-addressed
  ``snapshots/<dataset>/<sha256>.jsonl``. The trainer and eval read these.

Snapshots read entries page by page in (content_hash, id) order, backed by the dataset/hash index,
so that the order depends only on the content; no whole dataset is ever held in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import tempfile
import weakref
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import Text, and_, delete, func, or_, select, type_coerce
from sqlalchemy.engine import Row
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.api.dataset_files.schemas import DatasetExportOut, DatasetSnapshotOut
from services.api.dataset_files.spool import SpooledFile
from services.api.datasets.jobs import create_job, finish, record_progress
from services.api.datasets.models import Dataset, DatasetEntry, DatasetJob, DatasetSnapshot
from services.api.datasets.rows import to_training_row
from services.api.datasets.service import add_entries, get_dataset, lock_dataset
from services.api.pruning.models import PruningRule
from services.common.blobstore import BlobStore, BlobStoreError
from services.common.clock import iso, now
from services.common.errors import APIError, bad_request
from services.common.http import API_PREFIX, loads_json
from services.common.ids import new_id
from services.common.pruning import apply_pruning_rules

NDJSON = "application/x-ndjson"
UPLOAD_BATCH_LINES = 1000  # rows per add_entries call and per progress commit
MAX_LINE_BYTES = 64 * 1024 * 1024  # a longer line is reported, never buffered whole
ENTRY_PAGE = 1000
EXPORT_URL_TTL = timedelta(hours=1)
EXPORT_JOB = "export"
EXPORT_PROGRESS_SECONDS = 1.0
EXPORT_NAME_FORMAT = "%Y%m%dT%H%M%S%fZ"
EXPORT_NAME_PATTERN = r"^\d{8}T\d{12}Z\.jsonl$"
_BOM = b"\xef\xbb\xbf"


def upload_key(project_id: str, dataset_id: str, job_id: str) -> str:
    return f"uploads/{project_id}/{dataset_id}/{job_id}.jsonl"


def export_key(project_id: str, dataset_id: str, name: str) -> str:
    return f"exports/{project_id}/{dataset_id}/{name}"


def snapshot_key(dataset_id: str, content_hash: str) -> str:
    return f"snapshots/{dataset_id}/{content_hash}.jsonl"


def _dumps(value: Any) -> bytes:
    """Canonical JSON (sorted keys, no spaces): the same content always gives the same bytes."""
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


# --- reading entries -------------------------------------------------------------------------

_ENTRY_COLUMNS = (
    DatasetEntry.id,
    DatasetEntry.content_hash,
    DatasetEntry.split,
    DatasetEntry.messages,
    DatasetEntry.tools,
    DatasetEntry.tool_choice,
    DatasetEntry.response_format,
    DatasetEntry.output,
    DatasetEntry.rejected_message,
    DatasetEntry.entry_metadata.label("metadata"),
)


async def entry_pages(
    *, session: AsyncSession, dataset_id: str, page_size: int = ENTRY_PAGE
) -> AsyncIterator[list[Row]]:
    """The dataset's entries, ``page_size`` rows at a time, by keyset in (content_hash, id) order."""
    last: tuple[str, str] | None = None
    while True:
        query = select(*_ENTRY_COLUMNS).where(DatasetEntry.dataset_id == dataset_id)
        if last is not None:
            query = query.where(
                or_(
                    DatasetEntry.content_hash > last[0],
                    and_(DatasetEntry.content_hash == last[0], DatasetEntry.id > last[1]),
                )
            )
        rows = list(
            await session.execute(query.order_by(DatasetEntry.content_hash, DatasetEntry.id).limit(page_size))
        )
        if not rows:
            return
        yield rows
        if len(rows) < page_size:
            return
        last = (rows[-1].content_hash, rows[-1].id)


# Exports read the JSON columns as the text stored (written compact by orjson, see common/db.py)
# and splice it into lines: no decoding and encoding again of every message.
_RAW_ENTRY_COLUMNS = (
    DatasetEntry.id,
    DatasetEntry.split,
    *(
        type_coerce(column, Text).label(column.key)
        for column in (
            DatasetEntry.messages,
            DatasetEntry.output,
            DatasetEntry.tools,
            DatasetEntry.tool_choice,
            DatasetEntry.response_format,
            DatasetEntry.rejected_message,
        )
    ),
    type_coerce(DatasetEntry.entry_metadata, Text).label("metadata"),
)


async def entry_pages_by_id(
    *, session: AsyncSession, dataset_id: str, page_size: int = ENTRY_PAGE
) -> AsyncIterator[list[Row]]:
    """The dataset's entries in primary-key order, ``page_size`` rows at a time, their JSON columns
    as stored text (exports); the next page is read while the caller works on this one.

    Ids are time-ordered, so this is the order rows were added and lie on disk: sequential reads,
    where content-hash order (snapshots) reads a large dataset at random.
    """
    connection = await session.connection()  # Core rows: the ORM adds nothing to plain columns
    # ``dataset_id || ''`` keeps the planner on the primary key's ordered range scan; on the
    # dataset index it would sort every remaining row of the dataset again for each page.
    query = (
        select(*_RAW_ENTRY_COLUMNS)
        .where(DatasetEntry.dataset_id.concat("") == dataset_id)
        .order_by(DatasetEntry.id)
        .limit(page_size)
    )

    async def page(after: str | None) -> list[Row]:
        return list(
            await connection.execute(query if after is None else query.where(DatasetEntry.id > after))
        )

    upcoming: asyncio.Future[list[Row]] | None = None
    try:
        rows = await page(None)
        while rows:
            upcoming = asyncio.ensure_future(page(rows[-1].id)) if len(rows) == page_size else None
            yield rows
            rows = await upcoming if upcoming is not None else []
            upcoming = None
    finally:
        if upcoming is not None:  # the caller stopped early
            upcoming.cancel()
            with contextlib.suppress(BaseException):
                await upcoming


def _training_row(row: Row, messages: list[dict[str, Any]]) -> dict[str, Any]:
    return to_training_row(
        messages=messages,
        output=row.output,
        tools=row.tools,
        tool_choice=row.tool_choice,
        response_format=row.response_format,
        rejected_message=row.rejected_message,
        split=row.split,
        metadata=row.metadata,
    )


@dataclass
class Written:
    entry_count: int
    size: int
    sha256: str


async def _write_jsonl(path: Path, pages: AsyncIterator[list[bytes]]) -> Written:
    """Write the pages of lines to ``path`` (in a worker thread), counting and hashing them."""
    digest = hashlib.sha256()
    count = size = 0
    handle = await asyncio.to_thread(open, path, "wb")
    try:
        async for lines in pages:
            data = b"".join(lines)
            digest.update(data)
            count += len(lines)
            size += len(data)
            await asyncio.to_thread(handle.write, data)
    finally:
        await asyncio.to_thread(handle.close)
    return Written(count, size, digest.hexdigest())


@asynccontextmanager
async def _scratch_file(workdir: Path | None, suffix: str) -> AsyncIterator[Path]:
    if workdir is not None:
        await asyncio.to_thread(workdir.mkdir, parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(suffix=suffix, dir=workdir)
    os.close(fd)
    try:
        yield Path(name)
    finally:
        await asyncio.to_thread(Path(name).unlink, True)


# --- upload ----------------------------------------------------------------------------------


async def start_upload(
    *,
    sessions: async_sessionmaker[AsyncSession],
    blobs: BlobStore,
    project_id: str,
    dataset_id: str,
    spooled: SpooledFile,
) -> tuple[DatasetJob, str]:
    """Create the upload job and store the spooled file under its key; returns (job, blob URI).

    If the blob store refuses the file, the job row is removed again: nothing half-written stays.
    """
    file_info = {"name": spooled.filename, "bytes": spooled.size, "sha256": spooled.sha256}
    async with sessions.begin() as session:
        await get_dataset(session=session, project_id=project_id, dataset_id=dataset_id)
        job = await create_job(
            session=session,
            project_id=project_id,
            dataset_id=dataset_id,
            kind="upload",
            total=spooled.lines,
        )
        key = upload_key(project_id, dataset_id, job.id)
        job.params = {"key": key, "file": file_info}
        job.result = {"file": file_info}
    try:
        uri = await blobs.put_file(key, spooled.path, content_type=NDJSON)
    except BaseException:
        async with sessions.begin() as session:
            await session.execute(delete(DatasetJob).where(DatasetJob.id == job.id))
        raise
    return job, uri


async def iter_lines(
    chunks: AsyncIterator[bytes], *, max_line: int = MAX_LINE_BYTES
) -> AsyncIterator[tuple[int, bytes | None]]:
    """(1-based line number, line without its newline) for each line of the stream.

    A line longer than ``max_line`` comes as ``None`` and is skipped, never buffered whole.
    """
    pending = bytearray()
    number = 0
    overlong = False
    async for chunk in chunks:
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            piece = chunk[start:] if end < 0 else chunk[start:end]
            if not overlong:
                pending += piece
                if len(pending) > max_line:
                    overlong = True
                    pending.clear()
            if end < 0:
                break
            number += 1
            yield number, None if overlong else bytes(pending)
            pending.clear()
            overlong = False
            start = end + 1
    if pending or overlong:
        yield number + 1, None if overlong else bytes(pending)


@dataclass
class _UploadTotals:
    created: int = 0
    duplicates: int = 0

    def result(self, error_count: int) -> dict[str, int]:
        return {"entries_created": self.created, "duplicates": self.duplicates, "errors": error_count}


class _DatasetGone(Exception):
    """The job was deleted (with its dataset, by cascade) while the upload was being read."""


def _line_error(number: int, message: str) -> dict[str, Any]:
    return {"line": number, "message": f"line {number}: {message}"}


_BLANK = object()


def _parse_line(number: int, line: bytes | None) -> tuple[Any, dict[str, Any] | None]:
    """(row, None) for a JSON line, (None, error) for a bad one, (_BLANK, None) for a blank one."""
    if line is None:
        return None, _line_error(number, f"the line is longer than the limit of {MAX_LINE_BYTES} bytes")
    if number == 1 and line.startswith(_BOM):
        line = line[len(_BOM) :]
    if not line.strip():
        return _BLANK, None
    try:
        return loads_json(line, subject="The line"), None  # the JSON policy of every request body
    except APIError as exc:
        return None, _line_error(number, exc.message)


async def process_upload(
    *, sessions: async_sessionmaker[AsyncSession], blobs: BlobStore, job_id: str, uri: str | None = None
) -> None:
    """The upload job: read the stored file back line by line and add its rows in batches."""
    async with sessions.begin() as session:
        job = await session.get(DatasetJob, job_id)
        if job is None:
            return
        record_progress(job, status="running")
        if uri:
            job.params = {**job.params, "file": {**job.params.get("file", {}), "uri": uri}}
            job.result = {**job.result, "file": job.params["file"]}
        key, project_id, dataset_id = job.params["key"], job.project_id, job.dataset_id

    totals = _UploadTotals()
    batch: list[tuple[int, Any]] = []  # (line number, parsed JSON)
    problems: list[dict[str, Any]] = []
    rows_seen = 0
    done = 0

    async def commit() -> None:
        async with sessions.begin() as session:
            job = await session.get(DatasetJob, job_id)
            if job is None:
                raise _DatasetGone
            if batch:
                # Holding the dataset's write lock, so concurrent writers cannot slip in duplicates.
                dataset = await lock_dataset(session=session, project_id=project_id, dataset_id=dataset_id)
                added = await add_entries(
                    session=session, dataset=dataset, rows=[row for _, row in batch], source="upload"
                )
                problems.extend(_line_error(batch[p.index][0], p.message) for p in added.errors)
                totals.created += added.created
                totals.duplicates += added.duplicates
            problems.sort(key=lambda p: p["line"])
            record_progress(job, done=done, errors=problems)
            job.result = {**job.result, **totals.result(job.error_count)}
        batch.clear()
        problems.clear()

    try:
        async for number, line in iter_lines(blobs.iter_chunks(key), max_line=MAX_LINE_BYTES):
            done = number
            row, problem = _parse_line(number, line)
            if row is _BLANK:
                continue
            rows_seen += 1
            if problem is not None:
                problems.append(problem)
            else:
                batch.append((number, row))  # add_entries judges it (a JSON null is not an entry)
            if len(batch) + len(problems) >= UPLOAD_BATCH_LINES:
                await commit()
        if rows_seen == 0:
            problems.append({"line": 0, "message": "the file holds no JSON lines"})
        await commit()
    except _DatasetGone:
        return
    async with sessions.begin() as session:
        job = await session.get(DatasetJob, job_id)
        if job is None:
            return
        finish(job, result=totals.result(job.error_count))
        if job.error_count and not (totals.created or totals.duplicates):
            job.status = "failed"  # progress counts lines read, so finish() alone would say partial


# --- export ----------------------------------------------------------------------------------


@dataclass
class Export:
    dataset_id: str
    name: str
    key: str
    uri: str
    entry_count: int
    size: int
    created: datetime


_OPTIONAL_FIELDS = ("tools", "tool_choice", "response_format", "rejected_message")


def _present(text: str | None) -> bool:
    return text is not None and text != "null"


def _export_line(row: Row) -> bytes:
    """``to_training_row`` of a raw row, spliced from the stored JSON texts."""
    _, split, messages, output, tools, tool_choice, response_format, rejected, metadata = row
    if not (messages.startswith("[{") and messages.endswith("]")):  # not compact, or no messages
        values = (messages, output, tools, tool_choice, response_format, rejected, metadata)
        decoded = [orjson.loads(text) if _present(text) else None for text in values]
        fields = dict(zip(("messages", "output", *_OPTIONAL_FIELDS, "metadata"), decoded, strict=True))
        return orjson.dumps(to_training_row(**fields, split=split)) + b"\n"
    parts = ['{"messages":', messages[:-1], ",", output, "]"]
    for key, text in zip(_OPTIONAL_FIELDS, (tools, tool_choice, response_format, rejected), strict=True):
        if text is not None and text != "null":  # a JSON column holding None stores ``null``
            parts += [',"', key, '":', text]
    if split is not None:
        parts += [',"split":"', split, '"']  # TRAIN or TEST
    parts += [',"metadata":', metadata if _present(metadata) else "{}", "}\n"]
    return "".join(parts).encode()


async def _export_lines(session: AsyncSession, dataset_id: str) -> AsyncIterator[list[bytes]]:
    async for page in entry_pages_by_id(session=session, dataset_id=dataset_id):
        yield [_export_line(row) for row in page]


async def start_export(*, session: AsyncSession, dataset: Dataset) -> DatasetJob:
    """The export job, queued; ``run_export`` does the work and reports progress on it."""
    total = await session.scalar(
        select(func.count()).select_from(DatasetEntry).where(DatasetEntry.dataset_id == dataset.id)
    )
    return await create_job(
        session=session, project_id=dataset.project_id, dataset_id=dataset.id, kind=EXPORT_JOB, total=total
    )


async def _export_progress(sessions: async_sessionmaker[AsyncSession], job_id: str, done: int) -> None:
    async with sessions.begin() as session:
        job = await session.get(DatasetJob, job_id)
        if job is None:
            raise _DatasetGone
        record_progress(job, done=done)


async def run_export(
    *,
    sessions: async_sessionmaker[AsyncSession],
    blobs: BlobStore,
    job_id: str,
    workdir: Path | None = None,
) -> None:
    """The export job: the dataset as JSONL (re-importable by upload) to the blob store, written page
    by page with progress; the job's ``result`` is the ``dataset.export`` (name, download route, ...)."""
    async with sessions.begin() as session:
        job = await session.get(DatasetJob, job_id)
        if job is None:
            return
        record_progress(job, status="running")
        project_id, dataset_id = job.project_id, job.dataset_id
    moment = now()
    name = f"{moment.strftime(EXPORT_NAME_FORMAT)}.jsonl"
    key = export_key(project_id, dataset_id, name)
    written = 0
    reported = asyncio.get_running_loop().time()

    async def pages() -> AsyncIterator[list[bytes]]:
        nonlocal written, reported
        async with sessions() as session:
            async for lines in _export_lines(session, dataset_id):
                yield lines
                written += len(lines)
                if asyncio.get_running_loop().time() - reported >= EXPORT_PROGRESS_SECONDS:
                    await _export_progress(sessions, job_id, written)
                    reported = asyncio.get_running_loop().time()

    try:
        async with _scratch_file(workdir, ".jsonl") as path:
            result = await _write_jsonl(path, pages())
            uri = await blobs.put_file(key, path, content_type=NDJSON)
    except _DatasetGone:
        return
    except BlobStoreError as exc:
        async with sessions.begin() as session:
            if (job := await session.get(DatasetJob, job_id)) is not None:
                record_progress(job, errors=[{"message": f"the blob store is unavailable: {exc}"}])
                finish(job)
                job.status = "failed"  # no file was stored, whatever progress says
        return
    export = Export(dataset_id, name, key, uri, result.entry_count, result.size, moment)
    out = await export_out(export, blobs)
    async with sessions.begin() as session:
        job = await session.get(DatasetJob, job_id)
        if job is None:
            return
        record_progress(job, done=result.entry_count, total=result.entry_count)
        finish(job, result=out.model_dump())


async def export_out(export: Export, blobs: BlobStore) -> DatasetExportOut:
    url = await blobs.presigned_get_url(export.key, EXPORT_URL_TTL)
    return DatasetExportOut(
        dataset_id=export.dataset_id,
        name=export.name,
        uri=export.uri,
        url=url,
        url_expires=iso(now() + EXPORT_URL_TTL) if url else None,
        download=f"{API_PREFIX}/datasets/{export.dataset_id}/exports/{export.name}",
        entry_count=export.entry_count,
        bytes=export.size,
        created=iso(export.created),
    )


# --- snapshots -------------------------------------------------------------------------------

_snapshot_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()


def snapshot_lock(dataset_id: str) -> asyncio.Lock:
    """Serializes snapshot creation for one dataset in this process; hold it across the commit."""
    lock = _snapshot_locks.get(dataset_id)
    if lock is None:
        lock = _snapshot_locks[dataset_id] = asyncio.Lock()
    return lock


async def pruning_rule_texts(*, session: AsyncSession, dataset_id: str) -> tuple[str, ...]:
    """The dataset's rules in the order they apply."""
    query = (
        select(PruningRule.text)
        .where(PruningRule.dataset_id == dataset_id)
        .order_by(PruningRule.position, PruningRule.created_at, PruningRule.id)
    )
    return tuple(await session.scalars(query))


async def _snapshot_lines(
    session: AsyncSession, dataset_id: str, rules: tuple[str, ...]
) -> AsyncIterator[list[bytes]]:
    async for page in entry_pages(session=session, dataset_id=dataset_id):
        lines = []
        for row in page:
            line = _training_row(row, apply_pruning_rules(row.messages, rules))
            line["entry_id"] = row.id  # lets eval tie its per-row results back to the entry
            lines.append(_dumps(line) + b"\n")
        yield lines


async def _find_snapshot(session: AsyncSession, dataset_id: str, content_hash: str) -> DatasetSnapshot | None:
    return await session.scalar(
        select(DatasetSnapshot).where(
            DatasetSnapshot.dataset_id == dataset_id, DatasetSnapshot.content_hash == content_hash
        )
    )


async def create_snapshot(
    *,
    session: AsyncSession,
    blobs: BlobStore,
    dataset: Dataset,
    rules: Sequence[str] | None = None,
    workdir: Path | None = None,
) -> DatasetSnapshot:
    """Freeze ``dataset`` with its pruning rules applied (or ``rules``, e.g. a model's copied texts).

    The JSONL is canonical (entries in (content_hash, id) order, sorted keys), so the same content
    always hashes the same: an unchanged dataset gives back its existing snapshot row, and a
    changed one a new row and a new blob. Blobs are named by their sha256 and never rewritten.
    Each line is a ``to_training_row`` plus ``entry_id``. An empty dataset is a 400.
    """
    if rules is None:
        rules = await pruning_rule_texts(session=session, dataset_id=dataset.id)
    texts = tuple(rules)
    async with _scratch_file(workdir, ".jsonl") as path:
        written = await _write_jsonl(path, _snapshot_lines(session, dataset.id, texts))
        if written.entry_count == 0:
            raise bad_request(f"Dataset {dataset.id!r} has no entries to snapshot.", param="dataset_id")
        key = snapshot_key(dataset.id, written.sha256)
        existing = await _find_snapshot(session, dataset.id, written.sha256)
        if existing is not None:
            if not await blobs.exists(key):  # the store lost it: the bytes are the same, restore them
                await blobs.put_file(key, path, content_type=NDJSON)
            return existing
        uri = await blobs.put_file(key, path, content_type=NDJSON)
    snapshot = DatasetSnapshot(
        id=new_id("snap"),
        content_hash=written.sha256,
        dataset_id=dataset.id,
        uri=uri,
        entry_count=written.entry_count,
        created_at=now(),
    )
    try:
        async with session.begin_nested():
            session.add(snapshot)
    except IntegrityError:
        # Another process stored the same content between our check and our insert.
        existing = await _find_snapshot(session, dataset.id, written.sha256)
        if existing is None:
            raise
        return existing
    return snapshot


async def list_snapshots(*, session: AsyncSession, dataset_id: str) -> list[DatasetSnapshot]:
    """Newest first."""
    return list(
        await session.scalars(
            select(DatasetSnapshot)
            .where(DatasetSnapshot.dataset_id == dataset_id)
            .order_by(DatasetSnapshot.created_at.desc(), DatasetSnapshot.id.desc())
        )
    )


def snapshot_out(snapshot: DatasetSnapshot) -> DatasetSnapshotOut:
    return DatasetSnapshotOut(
        id=snapshot.id,
        dataset_id=snapshot.dataset_id,
        content_hash=snapshot.content_hash,
        uri=snapshot.uri,
        entry_count=snapshot.entry_count,
        created=iso(snapshot.created_at),
    )
