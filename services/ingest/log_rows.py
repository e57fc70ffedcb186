"""A ``logs.v1`` message → one ``request_logs`` row, at the writer's rate.

``LogEvent`` (pydantic, in ``services/common/events.py``) is the schema producers write
to. Validating it with pydantic builds every request and response as Python objects,
only for the writer to serialize them again: that alone cost ~40 µs per 1.5 KB log,
most of the writer's budget. So the writer decodes with an msgspec mirror of the same
schema that keeps both payloads as raw JSON, and reads just the few response fields it
derives columns from. Anything the mirror refuses goes through pydantic, which accepts
exactly what it always did (lax numbers, ...) and names the problem for the DLQ.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
import orjson

from services.common import anthropic_format
from services.common.events import MAX_STATUS_CODE, MAX_UNIX_MS, LogEvent
from services.common.pricing import cost_usd

_Id = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
_UnixMs = Annotated[int, msgspec.Meta(ge=0, le=MAX_UNIX_MS)]
_Status = Annotated[int, msgspec.Meta(ge=0, le=MAX_STATUS_CODE)]
_MAX_TOKENS = 2**32 - 1  # the token columns are UInt32
_NULL = msgspec.Raw(b"null")


class WireLogEvent(msgspec.Struct, forbid_unknown_fields=True):
    """``LogEvent`` as it arrives, payloads still raw JSON (field for field; a test keeps them in step)."""

    log_id: _Id
    project_id: _Id
    requested_at: _UnixMs
    received_at: _UnixMs
    req_payload: msgspec.Raw
    schema_version: Literal[1] = 1
    source: Literal["openai", "anthropic"] = "openai"
    resp_payload: msgspec.Raw = _NULL
    status_code: _Status | None = None
    error_message: str | None = None
    metadata: dict[str, str] = {}
    cache_hit: bool = False
    cost_usd: float | None = None


class _RequestView(msgspec.Struct):
    model: Any = None


class _ChoiceView(msgspec.Struct):
    finish_reason: Any = None


class _ResponseView(msgspec.Struct):
    id: Any = None
    model: Any = None
    usage: Any = None
    choices: list[_ChoiceView] = []


_wire_decoder = msgspec.json.Decoder(WireLogEvent)
_request_view = msgspec.json.Decoder(_RequestView)
_response_view = msgspec.json.Decoder(_ResponseView)


def decode_log_event(data: bytes) -> WireLogEvent:
    """Decode one message; raises pydantic's ``ValidationError`` when it is not a valid ``LogEvent``."""
    try:
        return _wire_decoder.decode(data)
    except msgspec.DecodeError:
        return wire_event(LogEvent.model_validate_json(data))  # raises with the reason, or was lax


def wire_event(event: LogEvent) -> WireLogEvent:
    return WireLogEvent(
        **event.model_dump(exclude={"req_payload", "resp_payload"}),
        req_payload=msgspec.Raw(orjson.dumps(event.req_payload)),
        resp_payload=msgspec.Raw(orjson.dumps(event.resp_payload)),
    )


def _view(decoder: msgspec.json.Decoder, raw: msgspec.Raw) -> Any:
    """The fields a column needs, or the whole value when it does not have the usual shape."""
    try:
        return decoder.decode(raw)
    except msgspec.ValidationError:
        return msgspec.json.decode(raw)


def _get(value: Any, name: str) -> Any:
    if isinstance(value, dict):
        return value.get(name)
    return getattr(value, name, None)


def _tokens(value: Any) -> int:
    """A token count as reported; what is not a count (negative, text, ...) counts as 0."""
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < float("inf"):
        return 0
    return min(int(value), _MAX_TOKENS)


def _usage(resp: Any) -> tuple[int, int]:
    usage = _get(resp, "usage")
    if not isinstance(usage, dict):
        return 0, 0
    return _tokens(usage.get("prompt_tokens")), _tokens(usage.get("completion_tokens"))


def _finish_reason(resp: Any) -> str:
    choices = _get(resp, "choices")
    if isinstance(choices, list) and choices:
        return str(_get(choices[0], "finish_reason") or "")
    return ""


def _payload_text(raw: msgspec.Raw) -> str:
    """Stored JSON text: as sent, but with ``\\u`` escapes written out so text search finds them."""
    if raw == _NULL:
        return ""
    data = bytes(raw)
    if b"\\u" in data:
        data = orjson.dumps(orjson.loads(data))
    return data.decode()


def _json_text(value: Any) -> str:
    return "" if value is None else orjson.dumps(value).decode()


def _provider(model: str, source: str) -> str:
    if source == "anthropic":
        return "anthropic"
    prefix, sep, _ = model.partition(":")
    return prefix if sep and prefix in ("openai", "anthropic", "gemini", "openpipe") else "openai"


def _status(event: WireLogEvent) -> str:
    if event.status_code is None:
        return "error" if event.error_message else "pending"
    return "success" if 200 <= event.status_code < 300 and not event.error_message else "error"


def event_to_row(event: WireLogEvent, now_ms: int) -> list[Any]:
    """Every column of ``store.COLUMNS`` (same order), derived from what the producer observed."""
    req_text, resp_text = _payload_text(event.req_payload), _payload_text(event.resp_payload)
    openai_req_text = openai_resp_text = ""
    if event.source == "anthropic":
        req = anthropic_format.request_to_openai(msgspec.json.decode(event.req_payload))
        resp = anthropic_format.response_to_openai(
            msgspec.json.decode(event.resp_payload), created=event.received_at // 1000
        )
        openai_req_text, openai_resp_text = _json_text(req), _json_text(resp)
    else:
        req, resp = _view(_request_view, event.req_payload), _view(_response_view, event.resp_payload)
    model = str(_get(req, "model") or _get(resp, "model") or "")
    prompt_tokens, completion_tokens = _usage(resp)
    status = _status(event)
    completion_id = str(_get(resp, "id") or "") if status == "success" else ""
    cost = event.cost_usd if event.cost_usd is not None else cost_usd(model, prompt_tokens, completion_tokens)
    return [
        event.project_id,
        event.log_id,
        0,
        event.source,
        event.requested_at,
        event.received_at,
        max(0, event.received_at - event.requested_at),
        model,
        _provider(model, event.source),
        completion_id,
        status,
        event.status_code,
        event.error_message,
        prompt_tokens,
        completion_tokens,
        _finish_reason(resp),
        cost if status == "success" else None,
        int(event.cache_hit),
        event.metadata,
        req_text,
        resp_text,
        openai_req_text,
        openai_resp_text,
        now_ms,
    ]
