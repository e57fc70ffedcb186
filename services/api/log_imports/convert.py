"""A request log becomes a dataset entry: the OpenAI-shaped request and response as a row, and a
serialized ``RequestLogBatch`` as driver rows. Runs in the conversion pool's worker processes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from services.api.datasets.bulk import PLACEHOLDER_MOMENT, EntryRow, entry_row
from services.api.datasets.rows import EntryDraft, EntryError, parse_entry
from services.api.datasets.service import draft_values, entry_ids
from services.api.log_imports.schemas import SOURCE
from services.common.grpc.distillery.v1 import logs_pb2

# The ``RequestLog`` fields a conversion reads (``id`` comes always): ingest sends only these.
LOG_FIELDS = ("status", "metadata", "openai_request_json", "openai_response_json")
OUTPUT_KEYS = ("role", "content", "tool_calls", "function_call", "name")
REQUEST_KEYS = ("tools", "tool_choice", "response_format", "functions", "function_call")


def _output(message: Any) -> dict[str, Any]:
    """The assistant message to learn, without response-only fields (``refusal``, ``annotations``...)."""
    if not isinstance(message, dict):
        raise EntryError("the logged response has no choices[0].message")
    output = {key: message[key] for key in OUTPUT_KEYS if message.get(key) is not None}
    output["role"] = "assistant"
    output.setdefault("content", None)
    return output


def log_to_row(request: Any, response: Any, metadata: dict[str, str]) -> dict[str, Any]:
    """An OpenAI-shaped request and response as a dataset row (the input format of ``parse_entry``)."""
    if not isinstance(request, dict):
        raise EntryError("the logged request is not a JSON object")
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages:
        raise EntryError("the logged request has no messages")
    choices = response.get("choices") if isinstance(response, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise EntryError("the logged response has no choices[0].message")
    row: dict[str, Any] = {"messages": [*messages, _output(choices[0].get("message"))], "metadata": metadata}
    for key in REQUEST_KEYS:
        if request.get(key) is not None:
            row[key] = request[key]
    return row


def log_to_draft(log_entry: logs_pb2.RequestLog) -> EntryDraft:
    try:
        request = orjson.loads(log_entry.openai_request_json) if log_entry.openai_request_json else None
        response = orjson.loads(log_entry.openai_response_json) if log_entry.openai_response_json else None
    except orjson.JSONDecodeError:
        raise EntryError("the logged payload is not valid JSON") from None
    return parse_entry(log_to_row(request, response, dict(log_entry.metadata)))


@dataclass
class Converted:
    """One message of the stream, converted: rows to insert and what was skipped."""

    read: int = 0  # logs this batch accounts for (entries, failed calls, invalid logs)
    failed_calls: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)
    rows: list[EntryRow] = field(default_factory=list)

    def extend(self, other: Converted) -> None:
        self.read += other.read
        self.failed_calls += other.failed_calls
        self.errors += other.errors
        self.rows += other.rows


def convert_batch(data: bytes, dataset_id: str, moment: Any) -> Converted:
    """A serialized ``RequestLogBatch`` → driver rows. Runs in a worker process (or inline)."""
    converted = Converted()
    ids = entry_ids()
    for entry in logs_pb2.RequestLogBatch.FromString(data).logs:
        converted.read += 1
        if entry.status != "success":
            converted.failed_calls += 1
            continue
        try:
            draft = log_to_draft(entry)
        except EntryError as exc:
            converted.errors.append({"log_id": entry.id, "message": str(exc)})
            continue
        values = draft_values(
            draft,
            dataset_id=dataset_id,
            source=SOURCE,
            source_log_id=entry.id,
            provenance=SOURCE,
            moment=PLACEHOLDER_MOMENT,  # replaced by ``moment`` in the row
            entry_id=next(ids),
        )
        converted.rows.append(entry_row(values, moment))
    return converted
