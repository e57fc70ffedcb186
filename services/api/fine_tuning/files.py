"""``POST /files`` (purpose ``fine-tune``): JSONL validated up front, frozen as a training snapshot.

Lines are OpenAI's chat format (``{"messages": [...], "tools"?}``) or its preference format
(``{"input": {"messages", "tools"?}, "preferred_output": [msg], "non_preferred_output": [msg]}``),
checked with the same rules as dataset entries. Each bad line is recorded as ``line N: why``; a job
started on a file with bad lines fails at once with those line numbers (the seed's behaviour). The
good rows become a canonical, content-addressed JSONL in the dataset snapshot format, which is all
the trainer ever reads.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from typing import Any

import orjson
from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from services.api.datasets.rows import EntryError, parse_entry, to_training_row
from services.api.fine_tuning.models import TrainingFile
from services.common.blobstore import BlobStore
from services.common.errors import bad_request, not_found

PURPOSES = ("fine-tune",)
MAX_RECORDED_ERRORS = 100
NDJSON = "application/x-ndjson"


def _as_entry(row: Any) -> dict[str, Any]:
    """An OpenAI training line as a dataset-entry row (raises EntryError naming the problem)."""
    if not isinstance(row, dict):
        raise EntryError("each line must be a JSON object")
    if "input" in row or "preferred_output" in row or "non_preferred_output" in row:
        source = row.get("input")
        if not isinstance(source, dict) or not isinstance(source.get("messages"), list):
            raise EntryError("input.messages is required for a preference (DPO) example")
        preferred, rejected = row.get("preferred_output"), row.get("non_preferred_output")
        for name, value in (("preferred_output", preferred), ("non_preferred_output", rejected)):
            if not isinstance(value, list) or len(value) != 1 or not isinstance(value[0], dict):
                raise EntryError(f"{name} must be a list holding one assistant message")
        return {
            "messages": [*source["messages"], preferred[0]],
            "tools": source.get("tools"),
            "rejected_message": rejected[0],
        }
    if "messages" not in row:
        raise EntryError("messages is required")
    return {
        key: row[key]
        for key in ("messages", "tools", "functions", "function_call", "tool_choice")
        if key in row
    }


def training_line(row: Any) -> dict[str, Any]:
    draft = parse_entry(_as_entry(row))
    return to_training_row(
        messages=draft.messages,
        output=draft.output,
        tools=draft.tools,
        tool_choice=draft.tool_choice,
        response_format=draft.response_format,
        rejected_message=draft.rejected_message,
        split="TRAIN",
        metadata={},
    )


def validate_jsonl(data: bytes) -> tuple[list[bytes], list[dict[str, Any]], int, int]:
    """(snapshot lines, errors [{line, message}], error count, preference rows)."""
    lines: list[bytes] = []
    errors: list[dict[str, Any]] = []
    error_count = preference = 0
    for number, raw in enumerate(data.removeprefix(b"\xef\xbb\xbf").split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            line = training_line(orjson.loads(raw))
        except orjson.JSONDecodeError as exc:
            problem = f"line {number}: invalid JSON at column {exc.colno}: {exc.msg}"
        except EntryError as exc:
            problem = f"line {number}: {exc}"
        else:
            preference += "rejected_message" in line
            lines.append(orjson.dumps(line, option=orjson.OPT_SORT_KEYS) + b"\n")
            continue
        error_count += 1
        if len(errors) < MAX_RECORDED_ERRORS:
            errors.append({"line": number, "message": problem})
    if not lines and not error_count:
        error_count, errors = 1, [{"line": 0, "message": "the file holds no training examples"}]
    return lines, errors, error_count, preference


def file_key(project_id: str, file_id: str) -> str:
    return f"files/{project_id}/{file_id}.jsonl"


def file_snapshot_key(file_id: str, content_hash: str) -> str:
    return f"snapshots/{file_id}/{content_hash}.jsonl"


async def create_file(
    *, session: AsyncSession, blobs: BlobStore, project_id: str, filename: str, purpose: str, data: bytes
) -> TrainingFile:
    if purpose not in PURPOSES:
        raise bad_request(f"purpose must be one of {', '.join(PURPOSES)}, not {purpose!r}.", param="purpose")
    file_id = f"file-{secrets.token_hex(12)}"
    lines, errors, error_count, preference = validate_jsonl(data)
    uri = await blobs.put_bytes(file_key(project_id, file_id), data, content_type=NDJSON)
    snapshot_key = None
    if not error_count:
        body = b"".join(lines)
        snapshot_key = file_snapshot_key(file_id, hashlib.sha256(body).hexdigest())
        await blobs.put_bytes(snapshot_key, body, content_type=NDJSON)
    if error_count > len(errors):
        errors.append({"line": None, "message": f"... and {error_count - len(errors)} more invalid lines"})
    row = TrainingFile(
        id=file_id,
        project_id=project_id,
        filename=filename[:512] or "upload.jsonl",
        purpose=purpose,
        bytes=len(data),
        uri=uri,
        snapshot_uri=snapshot_key,
        line_count=len(lines) + error_count,
        preference_rows=preference,
        errors=errors,
        created_at=int(time.time()),
    )
    session.add(row)
    await session.flush()
    return row


async def find_file(*, session: AsyncSession, project_id: str, file_id: str) -> TrainingFile | None:
    row = await session.get(TrainingFile, file_id)
    return row if row is not None and row.project_id == project_id else None


async def get_file(*, session: AsyncSession, project_id: str, file_id: str) -> TrainingFile:
    row = await find_file(session=session, project_id=project_id, file_id=file_id)
    if row is None:
        raise not_found(f"No file with id {file_id!r} in this project.", param="file_id")
    return row


async def list_files(*, session: AsyncSession, project_id: str) -> list[TrainingFile]:
    query = select(TrainingFile).where(TrainingFile.project_id == project_id)
    return list(await session.scalars(query.order_by(TrainingFile.created_at.desc(), TrainingFile.id)))


async def delete_file(*, session: AsyncSession, project_id: str, file_id: str) -> None:
    await get_file(session=session, project_id=project_id, file_id=file_id)
    await session.execute(delete(TrainingFile).where(TrainingFile.id == file_id))


def failure_message(row: TrainingFile) -> str:
    shown = "; ".join(e["message"] for e in row.errors[:5])
    return f"The training file {row.id} has invalid lines: {shown}"


def file_out(row: TrainingFile) -> dict[str, Any]:
    return {
        "id": row.id,
        "object": "file",
        "bytes": row.bytes,
        "created_at": row.created_at,
        "filename": row.filename,
        "purpose": row.purpose,
        "status": "error" if row.errors else "processed",
        "status_details": failure_message(row) if row.errors else None,
        "expires_at": None,
    }
