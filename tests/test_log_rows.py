"""Decoding ``logs.v1`` messages into rows: the fast msgspec path must agree with the ``LogEvent`` schema."""

from __future__ import annotations

import json

import msgspec
import orjson
import pytest
from pydantic import ValidationError

from services.common.events import LogEvent, flat_event_json
from services.ingest import store
from services.ingest.log_rows import WireLogEvent, decode_log_event, event_to_row, wire_event
from services.ingest.models import AnthropicReportRequest, ReportRequest
from services.ingest.service import report_to_event
from services.sample_traffic import ANTHROPIC_ROUTE, sample_reports

JSON_COLUMNS = ("req_payload", "resp_payload", "openai_req", "openai_resp")


def sample_events(n: int) -> list[LogEvent]:
    events = []
    for route, body in sample_reports(n, seed=7, now_ms=1_700_000_000_000):
        anthropic = route == ANTHROPIC_ROUTE
        model = AnthropicReportRequest if anthropic else ReportRequest
        source = "anthropic" if anthropic else "openai"
        events.append(report_to_event(model.model_validate(body), project_id="p", source=source))
    return events


def row(data: bytes) -> dict:
    return dict(zip(store.COLUMNS, event_to_row(decode_log_event(data), 0), strict=True))


def slow_row(data: bytes) -> dict:
    """The same message forced through pydantic (the path for anything msgspec refuses)."""
    wire = wire_event(LogEvent.model_validate_json(data))
    return dict(zip(store.COLUMNS, event_to_row(wire, 0), strict=True))


def comparable(values: dict) -> dict:
    return {k: (orjson.loads(v) if k in JSON_COLUMNS and v else v) for k, v in values.items()}


def test_wire_event_mirrors_the_log_event_schema() -> None:
    assert set(WireLogEvent.__struct_fields__) == set(LogEvent.model_fields)
    event = LogEvent(log_id="l", project_id="p", requested_at=1, received_at=2, req_payload={})
    wire = decode_log_event(event.model_dump_json().encode())
    for name in LogEvent.model_fields:
        if name not in ("req_payload", "resp_payload"):
            assert getattr(wire, name) == getattr(event, name), name


def test_fast_and_schema_paths_give_the_same_rows_for_realistic_traffic() -> None:
    events = sample_events(600)
    assert {e.source for e in events} == {"openai", "anthropic"}
    assert {e.status_code for e in events} > {200}  # failures are in the sample too
    for event in events:
        data = event.model_dump_json().encode()
        msgspec.json.decode(data, type=WireLogEvent)  # realistic events take the fast path
        assert comparable(row(data)) == comparable(slow_row(data))


def test_unusual_payload_shapes_derive_what_they_can() -> None:
    base = {"log_id": "l", "project_id": "p", "requested_at": 1, "received_at": 5, "status_code": 200}
    odd = row(orjson.dumps({**base, "req_payload": "just text", "resp_payload": ["a", "list"]}))
    assert (odd["model"], odd["prompt_tokens"], odd["finish_reason"]) == ("", 0, "")
    partial = row(
        orjson.dumps(
            {
                **base,
                "req_payload": {"model": "gpt-4o"},
                "resp_payload": {"choices": "none", "usage": {"prompt_tokens": "7"}, "id": 12},
            }
        )
    )
    assert (partial["model"], partial["prompt_tokens"], partial["completion_id"]) == ("gpt-4o", 7, "12")
    assert partial["finish_reason"] == ""


def test_lax_values_the_schema_accepts_are_still_accepted() -> None:
    event = {
        "log_id": "l",
        "project_id": "p",
        "requested_at": "1000",
        "received_at": 1500.0,
        "req_payload": {},
    }
    values = row(orjson.dumps(event))
    assert (values["requested_at_ms"], values["latency_ms"]) == (1000, 500)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"metadata": {"k": 1}}, "metadata.k"),
        ({"source": "bard"}, "source"),
        ({"log_id": ""}, "log_id"),
        ({"colour": "red"}, "colour"),
        ({"schema_version": 2}, "schema_version"),
        ({"status_code": 2**40}, "status_code"),  # would not fit the Int32 column
        ({"requested_at": 2**63 + 5}, "requested_at"),  # nor Int64
        ({"received_at": -1}, "received_at"),
    ],
)
def test_invalid_events_fail_with_the_schema_error(change: dict, named: str) -> None:
    event = {"log_id": "l", "project_id": "p", "requested_at": 1, "received_at": 2, "req_payload": {}}
    with pytest.raises(ValidationError) as raised:
        decode_log_event(orjson.dumps({**event, **change}))
    assert named in ".".join(str(p) for p in raised.value.errors()[0]["loc"])


def test_malformed_json_fails_with_the_schema_error() -> None:
    with pytest.raises(ValidationError, match="Invalid JSON"):
        decode_log_event(b'{"log_id": "l", "req_payload": {')


def test_payloads_are_stored_as_sent_with_unicode_escapes_written_out() -> None:
    request = {"model": "m", "messages": [{"role": "user", "content": "café ☕"}]}
    event = {"log_id": "l", "project_id": "p", "requested_at": 1, "received_at": 2, "req_payload": request}
    escaped = row(json.dumps(event, ensure_ascii=True).encode())  # how Python's json writes it
    assert "café ☕" in escaped["req_payload"]
    assert orjson.loads(escaped["req_payload"]) == request


@pytest.mark.parametrize(
    ("reported", "stored"),
    [(7, 7), ("12", 12), (1.9, 1), (-5, 0), (2**40, 2**32 - 1), ("many", 0), (None, 0), (True, 0), ([3], 0)],
)
def test_token_counts_are_stored_as_counts_whatever_was_reported(reported: object, stored: int) -> None:
    """The token columns are UInt32: a value that would not fit must not make the batch unwritable."""
    event = {
        "log_id": "l",
        "project_id": "p",
        "requested_at": 1,
        "received_at": 2,
        "status_code": 200,
        "req_payload": {"model": "gpt-4o-mini"},
        "resp_payload": {"usage": {"prompt_tokens": reported, "completion_tokens": reported}},
    }
    values = row(orjson.dumps(event))
    assert (values["prompt_tokens"], values["completion_tokens"]) == (stored, stored)


def test_the_fast_event_encoding_says_what_pydantics_says() -> None:
    for event in sample_events(300):
        fast = flat_event_json(event)
        assert json.loads(fast) == json.loads(event.model_dump_json())
        assert decode_log_event(fast) == wire_event(event)


def test_integers_beyond_64_bits_in_a_payload_survive_the_fast_encoding() -> None:
    payload = {"seed": 10**22, "n": -(2**64)}
    event = LogEvent(log_id="l1", project_id="p", requested_at=1, received_at=2, req_payload=payload)
    assert json.loads(flat_event_json(event))["req_payload"] == payload
