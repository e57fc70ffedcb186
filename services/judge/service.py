"""LLM-as-judge: render a criterion's prompt with one row, ask its model for a structured verdict.

The verdict is a forced tool call (``record_judgement {explanation, judgement: PASS|FAIL}``); a
JSON object in the reply's content is accepted too. A malformed reply is asked again once (with
what was wrong), then the verdict is ``status: "error"`` with ``invalid_judgement``. Transient
model errors (429, 5xx, unavailable) are retried with jittered backoff. Model calls in flight
are capped per project; callers past the cap wait their turn.

The model is reached through a ``ModelCaller`` (the router's gRPC ``Inference`` in the judge
service, the router's own ``ChatService`` for best-of-N), so the judging logic is one piece.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from services.common import metrics
from services.common.errors import APIError
from services.common.events import JudgementEvent
from services.common.pricing import cost_usd
from services.judge.criteria import CriterionVersion
from services.judge.protocol import JudgeBody, JudgeOut, JudgeUsageOut, server_timing

log = logging.getLogger(__name__)

JUDGEMENT_TOOL = "record_judgement"
PREFERENCE_TOOL = "record_preference"
JUDGE_SYSTEM = (
    "You are an impartial judge. You check one output of an AI model against a criterion.\n\n"
    "<criterion>\n{prompt}\n</criterion>\n\n"
    "Read the input and the output below. Decide whether the output passed the criterion "
    "(PASS) or failed it (FAIL), then call the `record_judgement` function with a short "
    "explanation first and the judgement second."
)
HEAD_TO_HEAD_SYSTEM = (
    "You are an impartial judge. You compare two outputs (A and B) that AI models produced for "
    "the same input.\n\n<instructions>\n{instructions}\n</instructions>\n\n"
    "Decide which output is better by those instructions, or TIE when neither is better, then "
    "call the `record_preference` function with a short explanation first and the winner second. "
    "The order of the outputs says nothing about their quality."
)
DEFAULT_HEAD_TO_HEAD = (
    "Prefer the output that is more correct, more helpful and follows the input's instructions."
)
MALFORMED_HINT = (
    "Your reply was not a valid `{tool}` call ({problem}). Call `{tool}` exactly once with "
    "valid JSON arguments."
)


def _tool(name: str, description: str, verdict: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {
                "type": "object",
                "properties": {"explanation": {"type": "string"}, **verdict},
                "required": ["explanation", *verdict],
                "additionalProperties": False,
            },
        },
    }


JUDGEMENT_TOOL_SPEC = _tool(
    JUDGEMENT_TOOL,
    "Record whether the output passed the criterion.",
    {"judgement": {"type": "string", "enum": ["PASS", "FAIL"]}},
)
PREFERENCE_TOOL_SPEC = _tool(
    PREFERENCE_TOOL,
    "Record which output is better.",
    {"winner": {"type": "string", "enum": ["A", "B", "TIE"]}},
)


# --- the model behind the judge -------------------------------------------------------------


class ModelError(Exception):
    """A judge-model call that failed; ``retryable`` for rate limits and server-side failures."""

    def __init__(self, message: str, *, code: str, retryable: bool, status: int = 502) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.retryable = retryable
        self.status = status


ModelCaller = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]
"""``(project_id, chat completion request) -> chat.completion``; raises ``ModelError``."""


class Malformed(ValueError):
    pass


# --- rendering -------------------------------------------------------------------------------


def _json(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_INDENT_2).decode()


def render_row(variables: tuple[str, ...], row_input: dict[str, Any], output: dict[str, Any]) -> str:
    """The row as the judge model reads it: the templated input fields, then the output."""
    parts = []
    inputs = [v for v in ("messages", "tools", "tool_choice") if v in variables and row_input.get(v)]
    if inputs:
        parts.append("<input>")
        parts += [f"<{name}>\n{_json(row_input[name])}\n</{name}>" for name in inputs]
        parts.append("</input>")
    parts.append(f"<output>\n{_json(output)}\n</output>")
    return "\n".join(parts)


def judgement_request(criterion: CriterionVersion, row_input: dict[str, Any], output: dict[str, Any]) -> dict:
    return {
        "model": criterion.model,
        "messages": [
            {"role": "system", "content": JUDGE_SYSTEM.format(prompt=criterion.prompt)},
            {"role": "user", "content": render_row(criterion.templated_variables, row_input, output)},
        ],
        "tools": [JUDGEMENT_TOOL_SPEC],
        "tool_choice": {"type": "function", "function": {"name": JUDGEMENT_TOOL}},
        "temperature": 0,
    }


def head_to_head_request(
    model: str, instructions: str, row_input: dict[str, Any], a: dict[str, Any], b: dict[str, Any]
) -> dict:
    row = render_row(("messages", "tools", "tool_choice"), row_input, {})
    row = row.rsplit("<output>", 1)[0]
    row += f"<output_a>\n{_json(a)}\n</output_a>\n<output_b>\n{_json(b)}\n</output_b>"
    return {
        "model": model,
        "messages": [
            {"role": "system", "content": HEAD_TO_HEAD_SYSTEM.format(instructions=instructions)},
            {"role": "user", "content": row},
        ],
        "tools": [PREFERENCE_TOOL_SPEC],
        "tool_choice": {"type": "function", "function": {"name": PREFERENCE_TOOL}},
        "temperature": 0,
    }


# --- parsing ---------------------------------------------------------------------------------


def _arguments(completion: dict[str, Any], tool: str) -> dict[str, Any]:
    """The verdict object: the tool call's arguments, else a JSON object in the content."""
    choices = completion.get("choices") or []
    if not choices or not isinstance(choices[0], dict):
        raise Malformed("the reply has no choices")
    message = choices[0].get("message") or {}
    for call in message.get("tool_calls") or []:
        function = (call or {}).get("function") or {}
        if function.get("name") == tool:
            return _object(function.get("arguments"), "the tool call's arguments")
    content = message.get("content")
    if isinstance(content, str) and content.strip():
        text = content.strip().removeprefix("```json").removeprefix("```").removesuffix("```")
        return _object(text, "the reply")
    raise Malformed(f"the reply has neither a {tool} call nor a JSON verdict")


def _object(text: Any, what: str) -> dict[str, Any]:
    try:
        value = orjson.loads(text) if isinstance(text, str | bytes) else text
    except orjson.JSONDecodeError:
        raise Malformed(f"{what} are not valid JSON") from None
    if not isinstance(value, dict):
        raise Malformed(f"{what} are not a JSON object")
    return value


def _choice(value: Any, allowed: tuple[str, ...], name: str) -> str:
    text = str(value or "").strip().upper()
    aliases = {"PASSED": "PASS", "FAILED": "FAIL"}
    text = aliases.get(text, text)
    if text not in allowed:
        raise Malformed(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    return text


def parse_judgement(completion: dict[str, Any]) -> tuple[str, str]:
    """``(PASS|FAIL, explanation)`` from the judge model's reply, or ``Malformed``."""
    verdict = _arguments(completion, JUDGEMENT_TOOL)
    return _choice(verdict.get("judgement"), ("PASS", "FAIL"), "judgement"), str(
        verdict.get("explanation") or ""
    )


def parse_preference(completion: dict[str, Any]) -> tuple[str, str]:
    verdict = _arguments(completion, PREFERENCE_TOOL)
    return _choice(verdict.get("winner"), ("A", "B", "TIE"), "winner"), str(verdict.get("explanation") or "")


# --- verdicts --------------------------------------------------------------------------------


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float | None = None
    model_seconds: float = 0.0  # waiting for the judge model (router and upstream), not tokens

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(self, model: str, completion: dict[str, Any]) -> None:
        usage = completion.get("usage") or {}
        prompt, out = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        self.prompt_tokens += prompt
        self.completion_tokens += out
        cost = cost_usd(model, prompt, out)
        if cost is not None:
            self.cost_usd = (self.cost_usd or 0.0) + cost

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }
        if self.cost_usd is not None:
            out["cost_usd"] = round(self.cost_usd, 8)
        return out


@dataclass
class Verdict:
    """One criterion's verdict on one output."""

    criterion: CriterionVersion
    status: Literal["success", "error"]
    judgement: Literal["PASS", "FAIL"] | None = None
    explanation: str = ""
    usage: Usage = field(default_factory=Usage)
    error_code: str | None = None
    error_message: str | None = None
    error_status: int = 502
    latency_ms: int = 0
    judgement_id: str = field(default_factory=lambda: "jdg_" + secrets.token_hex(10))

    @property
    def score(self) -> float:
        return 1.0 if self.judgement == "PASS" else 0.0

    def result(self) -> dict[str, Any]:
        """The ``criteria_results`` entry of a best-of-N choice."""
        if self.status == "success":
            return {"status": "success", "score": self.score, "explanation": self.explanation}
        return {
            "status": "error",
            "score": 0.0,
            "errorCode": self.error_code,
            "errorMessage": self.error_message,
        }

    def event(self, project_id: str, source: str) -> JudgementEvent:
        return JudgementEvent(
            judgement_id=self.judgement_id,
            project_id=project_id,
            criterion=self.criterion.name,
            criterion_version=self.criterion.version,
            model=self.criterion.model,
            source=source,
            status=self.status,
            score=self.score,
            judgement=self.judgement,
            explanation=self.explanation if self.status == "success" else (self.error_message or ""),
            error_code=self.error_code,
            prompt_tokens=self.usage.prompt_tokens,
            completion_tokens=self.usage.completion_tokens,
            cost_usd=self.usage.cost_usd,
            latency_ms=self.latency_ms,
            created_at=int(time.time() * 1000),
        )


@dataclass
class Preference:
    status: Literal["success", "error"]
    model: str
    winner: Literal["A", "B", "TIE"] | None = None
    explanation: str = ""
    usage: Usage = field(default_factory=Usage)
    error_code: str | None = None
    error_message: str | None = None


Recorder = Callable[[JudgementEvent], None]


class Judge:
    def __init__(
        self,
        model: ModelCaller,
        *,
        max_concurrency: int = 64,
        max_attempts: int = 3,
        malformed_retries: int = 1,
        base_delay: float = 0.25,
        recorder: Recorder | None = None,
    ) -> None:
        self.model = model
        self.max_concurrency = max_concurrency
        self.max_attempts = max_attempts
        self.malformed_retries = malformed_retries
        self.base_delay = base_delay
        self.recorder = recorder
        self._slots: dict[str, asyncio.Semaphore] = defaultdict(
            lambda: asyncio.Semaphore(self.max_concurrency)
        )

    async def _ask(
        self,
        project_id: str,
        request: dict[str, Any],
        usage: Usage,
        parse: Callable[[dict[str, Any]], tuple[str, str]],
        tool: str,
    ) -> tuple[str, str]:
        """Ask until a well-formed verdict; raises ``ModelError`` (code ``invalid_judgement`` when
        the replies stayed malformed)."""
        malformed_left = self.malformed_retries
        attempt = 0
        while True:
            attempt += 1
            try:
                async with self._slots[project_id]:
                    called = time.perf_counter()
                    try:
                        completion = await self.model(project_id, request)
                    finally:
                        usage.model_seconds += time.perf_counter() - called
            except ModelError as exc:
                if not exc.retryable or attempt >= self.max_attempts:
                    raise
                await asyncio.sleep(self.base_delay * 2 ** (attempt - 1) * (0.5 + random.random() / 2))
                continue
            usage.add(request["model"], completion)
            try:
                return parse(completion)
            except Malformed as exc:
                if malformed_left <= 0:
                    # 422, not 5xx: the criterion's judge model cannot do the job; choose another.
                    raise ModelError(
                        f"The judge model's reply was not a valid verdict after a retry: {exc}. "
                        "Use a judge model that supports tool calls or JSON output.",
                        code="invalid_judgement",
                        retryable=False,
                        status=422,
                    ) from None
                malformed_left -= 1
                hint = {"role": "user", "content": MALFORMED_HINT.format(tool=tool, problem=exc)}
                request = {**request, "messages": [*request["messages"][:2], hint]}

    async def judge(
        self,
        project_id: str,
        criterion: CriterionVersion,
        row_input: dict[str, Any],
        output: dict[str, Any],
        *,
        source: str = "api",
    ) -> Verdict:
        """Never raises for model failures: they become ``status: "error"`` verdicts."""
        started = time.perf_counter()
        verdict = Verdict(criterion=criterion, status="error")
        try:
            judgement, verdict.explanation = await self._ask(
                project_id,
                judgement_request(criterion, row_input, output),
                verdict.usage,
                parse_judgement,
                JUDGEMENT_TOOL,
            )
            verdict.status, verdict.judgement = "success", judgement  # type: ignore[assignment]
        except ModelError as exc:
            verdict.error_code, verdict.error_message, verdict.error_status = (
                exc.code,
                exc.message,
                exc.status,
            )
        verdict.latency_ms = int((time.perf_counter() - started) * 1000)
        metrics.JUDGE_JUDGEMENTS.labels(verdict.judgement or "error").inc()
        if self.recorder is not None:
            self.recorder(verdict.event(project_id, source))
        return verdict

    async def head_to_head(
        self,
        project_id: str,
        *,
        model: str,
        instructions: str,
        row_input: dict[str, Any],
        a: dict[str, Any],
        b: dict[str, Any],
        swap_check: bool = False,
    ) -> Preference:
        preference = Preference(status="error", model=model)
        instructions = instructions.strip() or DEFAULT_HEAD_TO_HEAD
        try:
            asks = [head_to_head_request(model, instructions, row_input, a, b)]
            if swap_check:
                asks.append(head_to_head_request(model, instructions, row_input, b, a))
            answers = await asyncio.gather(
                *(self._ask(project_id, r, preference.usage, parse_preference, PREFERENCE_TOOL) for r in asks)
            )
        except ModelError as exc:
            preference.error_code, preference.error_message = exc.code, exc.message
            return preference
        winner, explanation = answers[0]
        if swap_check:
            swapped = {"A": "B", "B": "A", "TIE": "TIE"}[answers[1][0]]
            if swapped != winner:
                winner = "TIE"
                explanation += " (the verdict changed when the outputs were swapped: a tie)"
        preference.status, preference.winner, preference.explanation = "success", winner, explanation  # type: ignore[assignment]
        return preference


# --- POST /criteria/judge (fastpath.py and views.py) -------------------------------------------


async def judge_once(service: Any, project_id: str, body: JudgeBody) -> tuple[JudgeOut, str]:
    """The verdict and its ``Server-Timing`` header value. Unknown criterion or version:
    404 ``criterion_not_found``. A judge model that fails after retries: its status (429 rate
    limited, 400 when the judge model cannot be routed, 422 ``invalid_judgement`` when its reply
    stayed malformed, else 502), with ``code`` saying why."""
    started = time.perf_counter()
    criterion = await service.catalog.resolve(project_id, body.criterion_id)
    row_input = body.input.model_dump(exclude_none=True) if body.input else {}
    output = body.output.model_dump(exclude_none=True)
    verdict = await service.judge.judge(project_id, criterion, row_input, output, source="api")
    if verdict.status != "success":
        raise APIError(
            verdict.error_status,
            verdict.error_message or "The judge model failed.",
            type="server_error" if verdict.error_status >= 500 else "invalid_request_error",
            code=verdict.error_code,
        )
    out = JudgeOut(
        score=verdict.score,
        explanation=verdict.explanation,
        usage=JudgeUsageOut(**verdict.usage.as_dict()),
        criterion_id=criterion.id,
        judgement=verdict.judgement or "",
    )
    timing = server_timing(
        total_seconds=time.perf_counter() - started, model_seconds=verdict.usage.model_seconds
    )
    return out, timing
