"""Sample traffic for /report and /report-anthropic: deterministic, well-formed, realistic."""

from __future__ import annotations

import json
import random
import statistics
from typing import Any

import pytest

from services.sample_traffic import (
    ANTHROPIC_ROUTE,
    OPENAI_ROUTE,
    anthropic_report,
    openai_report,
    sample_reports,
)

N = 2_000


@pytest.fixture(scope="module")
def reports() -> list[tuple[str, dict[str, Any]]]:
    return sample_reports(N)


def _size(body: dict[str, Any]) -> int:
    return len(json.dumps(body).encode())


def _ok(reports: list[tuple[str, dict[str, Any]]], route: str) -> list[dict[str, Any]]:
    return [body for r, body in reports if r == route and body["statusCode"] == 200]


def test_deterministic_for_a_seed() -> None:
    assert sample_reports(200, seed=3) == sample_reports(200, seed=3)
    assert sample_reports(200, seed=3) != sample_reports(200, seed=4)
    assert openai_report(5, random.Random(1)) == openai_report(5, random.Random(1))
    assert anthropic_report(5, random.Random(1)) == anthropic_report(5, random.Random(1))


def test_bodies_are_json_and_camel_case(reports: list[tuple[str, dict[str, Any]]]) -> None:
    for route, body in reports:
        assert json.loads(json.dumps(body)) == body
        assert {"requestedAt", "receivedAt", "reqPayload", "respPayload", "statusCode"} <= set(body)
        if route == ANTHROPIC_ROUTE:
            assert all(isinstance(v, str) for v in body["metadata"].values())
            assert body["metadata"]["prompt_id"]
        else:
            assert set(body["reqPayload"]["metadata"]) == {"prompt_id", "customer_tier", "env"}


def test_size_bounds(reports: list[tuple[str, dict[str, Any]]]) -> None:
    sizes = [_size(body) for _, body in reports]
    assert 1_000 <= statistics.median(sizes) <= 2_000
    assert max(sizes) <= 4_096


def test_timestamps(reports: list[tuple[str, dict[str, Any]]]) -> None:
    for _, body in reports:
        assert body["requestedAt"] <= body["receivedAt"]
        assert 300 <= body["receivedAt"] - body["requestedAt"] <= 4_000
    shifted = sample_reports(10, now_ms=1_000_000)
    assert all(body["requestedAt"] >= 1_000_000 for _, body in shifted)


def test_openai_usage_adds_up(reports: list[tuple[str, dict[str, Any]]]) -> None:
    for body in _ok(reports, OPENAI_ROUTE):
        usage = body["respPayload"]["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0


def test_openai_response_shape(reports: list[tuple[str, dict[str, Any]]]) -> None:
    finish_reasons = set()
    for body in _ok(reports, OPENAI_ROUTE):
        resp = body["respPayload"]
        assert resp["id"].startswith("chatcmpl-")
        assert resp["object"] == "chat.completion"
        assert resp["system_fingerprint"].startswith("fp_")
        choice = resp["choices"][0]
        finish_reasons.add(choice["finish_reason"])
        if choice["finish_reason"] == "length":
            assert choice["message"]["content"]
    assert finish_reasons == {"stop", "tool_calls", "length"}


def test_tool_call_responses(reports: list[tuple[str, dict[str, Any]]]) -> None:
    tool_calls = 0
    for body in _ok(reports, OPENAI_ROUTE):
        choice = body["respPayload"]["choices"][0]
        if not choice["message"].get("tool_calls"):
            continue
        tool_calls += 1
        assert choice["finish_reason"] == "tool_calls"
        assert choice["message"]["content"] is None
        assert "tools" in body["reqPayload"] and "tool_choice" in body["reqPayload"]
        for call in choice["message"]["tool_calls"]:
            assert isinstance(json.loads(call["function"]["arguments"]), dict)
    assert tool_calls > 0


def test_anthropic_shape(reports: list[tuple[str, dict[str, Any]]]) -> None:
    stop_reasons = set()
    for body in _ok(reports, ANTHROPIC_ROUTE):
        req, resp = body["reqPayload"], body["respPayload"]
        assert req["max_tokens"] > 0 and isinstance(req["system"], str)
        for tool in req.get("tools", []):
            assert "input_schema" in tool
        assert resp["id"].startswith("msg_") and resp["type"] == "message"
        assert resp["role"] == "assistant"
        stop_reasons.add(resp["stop_reason"])
        kinds = {block["type"] for block in resp["content"]}
        assert ("tool_use" in kinds) == (resp["stop_reason"] == "tool_use")
        assert resp["usage"]["input_tokens"] > 0 and resp["usage"]["output_tokens"] > 0
    assert {"end_turn", "tool_use"} <= stop_reasons


def test_error_share(reports: list[tuple[str, dict[str, Any]]]) -> None:
    failures = [body for _, body in reports if body["statusCode"] != 200]
    assert 0.01 <= len(failures) / N <= 0.06
    for body in failures:
        assert body["statusCode"] in {429, 500, 529}
        assert body["errorMessage"]
        assert "error" in body["respPayload"]


def test_anthropic_share(reports: list[tuple[str, dict[str, Any]]]) -> None:
    share = sum(route == ANTHROPIC_ROUTE for route, _ in reports) / N
    assert 0.07 <= share <= 0.13
    assert all(route == OPENAI_ROUTE for route, _ in sample_reports(100, anthropic_share=0.0))
    assert all(route == ANTHROPIC_ROUTE for route, _ in sample_reports(100, anthropic_share=1.0))
