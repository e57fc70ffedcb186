"""``POST /criteria/judge`` on the wire: the request and answer models (the OpenPipe SDK's
``get_criterion_judgement``), and the ``server-timing`` header both transports send."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class JudgeInput(BaseModel):
    model_config = ConfigDict(extra="allow")

    messages: list[dict[str, Any]] = Field(default_factory=list)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None


class JudgeOutput(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str = "assistant"
    content: str | list[Any] | None = None
    tool_calls: list[dict[str, Any]] | None = None


class JudgeBody(BaseModel):
    criterion_id: str = Field(min_length=1, max_length=300, description='"name" (latest) or "name@vN"')
    input: JudgeInput | None = None
    output: JudgeOutput


class JudgeUsageOut(BaseModel):
    total_tokens: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float | None = None


class JudgeOut(BaseModel):
    score: float = Field(description="1 = PASS, 0 = FAIL")
    explanation: str
    usage: JudgeUsageOut
    criterion_id: str = Field(description="the version that judged: name@vN")
    judgement: str = Field(description="PASS or FAIL")


def server_timing(*, total_seconds: float, model_seconds: float) -> str:
    """The ``Server-Timing`` header: ``judge`` is the time the judge spent on the validated request,
    ``model`` the part of it spent waiting for the judge model (router and upstream), so callers
    can tell the judge's own time apart."""
    return f"judge;dur={total_seconds * 1000:.2f}, model;dur={model_seconds * 1000:.2f}"


def parse_server_timing(header: str) -> dict[str, float]:
    """``judge;dur=201.30, model;dur=200.90`` -> ``{"judge": 201.3, "model": 200.9}`` (ms)."""
    metrics = (part.strip().partition(";dur=") for part in header.split(","))
    return {name: float(ms) for name, _, ms in metrics}
