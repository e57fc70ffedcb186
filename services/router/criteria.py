"""Runtime best-of-N: ``op-criteria`` on ``/chat/completions``.

The completion is generated as usual (``n`` choices), then every choice is judged by every
criterion at once (n x K judge calls in flight together, so the added latency is about one judge
call), each choice gains ``criteria_results``, choices are sorted by their combined score (highest
first; ties keep their order) and ``usage.criteria`` sums the judges' tokens per criterion.

Criteria come from ``catalog.v1`` (the same projection the judge service uses), and the judge
models are called through this router's own ``ChatService``, not over the network.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from services.common.errors import APIError
from services.judge.criteria import CriteriaCatalog
from services.judge.service import Judge, ModelCaller, ModelError
from services.judge.wiring import build_judge
from services.router.protocol import CallOptions

if TYPE_CHECKING:
    from services.platform import Platform
    from services.router.service import ChatService

INPUT_FIELDS = ("messages", "tools", "tool_choice")


def chat_caller(chat: ChatService) -> ModelCaller:
    """Judge-model calls through this router, unlogged and uncached; errors as ``ModelError``."""

    async def call(project_id: str, request: dict[str, Any]) -> dict[str, Any]:
        try:
            return await chat.complete(project_id=project_id, raw=request, options=CallOptions())
        except APIError as exc:
            retryable = exc.status_code == 429 or exc.status_code >= 500
            status = exc.status_code if retryable else 400
            raise ModelError(
                f"The judge model call failed: {exc.message}",
                code=exc.code or ("rate_limited" if exc.status_code == 429 else "upstream_error"),
                retryable=retryable,
                status=status,
            ) from None

    return call


def _output(choice: dict[str, Any]) -> dict[str, Any]:
    message = choice.get("message") or {}
    output = {"role": "assistant", "content": message.get("content")}
    if message.get("tool_calls"):
        output["tool_calls"] = message["tool_calls"]
    return output


class BestOfN:
    def __init__(self, catalog: CriteriaCatalog, judge: Judge) -> None:
        self.catalog = catalog
        self.judge = judge

    async def complete(
        self, chat: ChatService, *, project_id: str, raw: dict[str, Any], options: CallOptions
    ) -> dict[str, Any]:
        criteria = [await self.catalog.resolve(project_id, c) for c in options.criteria]
        completion = await chat.complete(
            project_id=project_id, raw=raw, options=replace(options, criteria=())
        )
        choices = [c for c in completion.get("choices") or [] if isinstance(c, dict)]
        row_input = {k: raw[k] for k in INPUT_FIELDS if raw.get(k) is not None}
        verdicts = await asyncio.gather(
            *(
                self.judge.judge(project_id, criterion, row_input, _output(choice), source="runtime")
                for choice in choices
                for criterion in criteria
            )
        )
        usage: dict[str, dict[str, int]] = {c.name: {"total_tokens": 0} for c in criteria}
        scored = []
        for i, choice in enumerate(choices):
            mine = verdicts[i * len(criteria) : (i + 1) * len(criteria)]
            choice["criteria_results"] = {v.criterion.name: v.result() for v in mine}
            for verdict in mine:
                usage[verdict.criterion.name]["total_tokens"] += verdict.usage.total_tokens
            scored.append((sum(v.score for v in mine), i, choice))
        scored.sort(key=lambda item: (-item[0], item[1]))
        completion = {**completion, "choices": [choice for _, _, choice in scored]}
        completion["usage"] = {**(completion.get("usage") or {}), "criteria": usage}
        return completion


def setup_best_of_n(platform: Platform, chat: ChatService) -> None:
    """Materialize criteria from ``catalog.v1`` and let ``chat`` serve ``op-criteria``."""
    catalog, judge = build_judge(platform, chat_caller(chat))
    chat.best_of_n = BestOfN(catalog, judge)
