"""Mixture of agents (``moa:<model>``): drafts at high temperature, a critique of them, then a
final synthesis, all from the base model; the answer carries the usage of every call."""

from __future__ import annotations

import asyncio
from typing import Any

from services.router.providers.base import Provider
from services.router.routing import Route
from services.router.upstream import Upstream

DRAFTS = 3
DRAFT_TEMPERATURE = 0.9
CRITIQUE_PROMPT = (
    "Here are candidate responses to the conversation above:\n\n{drafts}\n\n"
    "Critique each one: what is correct, what is wrong or missing, and which parts the best possible "
    "response should keep."
)
SYNTHESIS_PROMPT = (
    "Candidate responses and a critique of them follow. Write the single best response to the "
    "conversation, using them.\n\n{drafts}\n\n<critique>\n{critique}\n</critique>"
)


async def complete(
    provider: Provider,
    upstream: Upstream,
    route: Route,
    body: dict[str, Any],
    *,
    model: str,
    timeout: float | None,
) -> dict[str, Any]:
    """The final answer to ``body`` (already prepared for the base model's ``route``), named ``model``."""
    body = {k: v for k, v in body.items() if k != "n"}
    base = body["model"]
    usage: dict[str, int] = {}

    async def ask(request: dict[str, Any]) -> dict[str, Any]:
        completion = await provider.complete(upstream, route, request, model=base, timeout=timeout)
        _add_usage(usage, completion)
        return completion

    drafts = await asyncio.gather(*(ask({**body, "temperature": DRAFT_TEMPERATURE}) for _ in range(DRAFTS)))
    drafted = "\n\n".join(
        f"<draft {i + 1}>\n{_answer_text(d)}\n</draft {i + 1}>" for i, d in enumerate(drafts)
    )
    critique_turn = {"role": "user", "content": CRITIQUE_PROMPT.format(drafts=drafted)}
    critique = await ask(
        {**_without_tools(body), "temperature": 0, "messages": [*body["messages"], critique_turn]}
    )
    synthesis_turn = {
        "role": "system",
        "content": SYNTHESIS_PROMPT.format(drafts=drafted, critique=_answer_text(critique)),
    }
    final = await ask({**body, "messages": [*body["messages"], synthesis_turn]})
    final["model"] = model
    final["usage"] = usage
    return final


def _add_usage(total: dict[str, int], completion: dict[str, Any]) -> None:
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        total[key] = total.get(key, 0) + int((completion.get("usage") or {}).get(key) or 0)


def _answer_text(completion: dict[str, Any]) -> str:
    message = (completion.get("choices") or [{}])[0].get("message") or {}
    text = message.get("content") or ""
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        text += f"\n[tool call {function.get('name')}({function.get('arguments')})]"
    return text.strip()


def _without_tools(body: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v
        for k, v in body.items()
        if k not in ("tools", "tool_choice", "functions", "function_call", "response_format")
    }
