"""Chat completions on the model server: validate and tokenize a request, submit one sequence per
choice to its engine, and answer as one ``chat.completion`` or as SSE chunks."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import torch
from fastapi import Request
from pydantic import ValidationError

from services.common.errors import APIError, bad_request, invalid_input
from services.serving.chat_format import TOOL_CALL_OPEN, parse_tool_calls, render_prompt
from services.serving.engine import (
    Delta,
    Engine,
    EngineError,
    SamplingParams,
    Sequence,
    collect,
    threadsafe_emitter,
)
from services.serving.protocol import ChatRequest, completion_id, now, usage
from services.serving.registry import ModelRegistry

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 4096


def context_exceeded(message: str) -> APIError:
    return APIError(400, message, param="messages", code="context_length_exceeded")


@dataclass
class Prepared:
    """A validated request, tokenized, with one sequence per choice submitted to its engine."""

    request: ChatRequest
    engine: Engine
    prompt_tokens: int
    queues: list[asyncio.Queue[Delta]] = field(default_factory=list)
    sequences: list[Sequence] = field(default_factory=list)

    def cancel(self) -> None:
        for sequence in self.sequences:
            sequence.cancelled = True


async def parse_body(request: Request) -> ChatRequest:
    try:
        raw = orjson.loads(await request.body())
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"Request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(raw, dict):
        raise bad_request("Request body must be a JSON object.")
    try:
        return ChatRequest.model_validate(raw)
    except ValidationError as exc:
        raise invalid_input(exc.errors()) from None


def _max_tokens(request: ChatRequest, prompt_tokens: int, window: int) -> int:
    if prompt_tokens >= window:
        raise context_exceeded(
            f"This model's maximum context length is {window} tokens. However, your messages resulted "
            f"in {prompt_tokens} tokens. Please reduce the length of the messages."
        )
    limit = request.token_limit
    if limit is None:
        return min(window - prompt_tokens, DEFAULT_MAX_TOKENS)
    if prompt_tokens + limit > window:
        raise context_exceeded(
            f"This model's maximum context length is {window} tokens. However, you requested "
            f"{prompt_tokens + limit} tokens ({prompt_tokens} in the messages, {limit} in the "
            "completion). Please reduce the length of the messages or completion."
        )
    return limit


async def prepare(registry: ModelRegistry, request: ChatRequest) -> Prepared:
    engine, adapter = await registry.resolve(request.model)
    try:
        prompt = render_prompt(engine.tokenizer, request.plain_messages, request.tools)
    except Exception as exc:  # the base's template refused these messages (a jinja error)
        raise bad_request(f"The messages cannot be rendered by the model's chat template: {exc}") from None
    ids = await asyncio.to_thread(engine.count_tokens, prompt)
    params = SamplingParams(
        max_tokens=_max_tokens(request, len(ids), engine.context_window),
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        stop=request.stops,
        seed=request.seed,
        hold_after=TOOL_CALL_OPEN if request.wants_tools else None,
    )
    prepared = Prepared(request, engine, len(ids))
    loop = asyncio.get_running_loop()
    for index in range(request.n):
        queue: asyncio.Queue[Delta] = asyncio.Queue()
        generator = None
        if request.seed is not None:
            generator = torch.Generator().manual_seed(request.seed + index)
        sequence = Sequence(
            prompt_ids=ids,
            adapter=adapter.internal if adapter else None,
            params=params,
            emit=threadsafe_emitter(loop, queue),
            generator=generator,
        )
        prepared.queues.append(queue)
        prepared.sequences.append(sequence)
        engine.submit(sequence)
    return prepared


def _message(text: str, finish: str, wants_tools: bool) -> tuple[dict[str, Any], str]:
    if wants_tools:
        content, calls = parse_tool_calls(text)
        if calls:
            return {"role": "assistant", "content": content, "tool_calls": calls}, "tool_calls"
    return {"role": "assistant", "content": text}, finish


async def complete(prepared: Prepared) -> dict[str, Any]:
    request = prepared.request
    try:
        results = await asyncio.gather(*(collect(q) for q in prepared.queues))
    except EngineError as exc:
        raise APIError(
            500, f"Generation failed: {exc}", type="server_error", code="generation_failed"
        ) from None
    finally:
        prepared.cancel()
    choices = []
    for index, (text, finish, _) in enumerate(results):
        message, finish_reason = _message(text, finish, request.wants_tools)
        choices.append({"index": index, "message": message, "logprobs": None, "finish_reason": finish_reason})
    return {
        "id": completion_id(),
        "object": "chat.completion",
        "created": now(),
        "model": request.model,
        "choices": choices,
        "usage": usage(prepared.prompt_tokens, sum(r[2] for r in results)),
    }


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


async def stream(prepared: Prepared) -> AsyncIterator[bytes]:
    """Chunks as each choice's text arrives; tool calls once the choice ends; usage when asked."""
    request = prepared.request
    base = {
        "id": completion_id(),
        "object": "chat.completion.chunk",
        "created": now(),
        "model": request.model,
    }

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None) -> bytes:
        return _sse(
            {**base, "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        )

    merged: asyncio.Queue[tuple[int, Delta]] = asyncio.Queue()

    async def pump(index: int, queue: asyncio.Queue[Delta]) -> None:
        while True:
            delta = await queue.get()
            await merged.put((index, delta))
            if delta.finish_reason or delta.error:
                return

    pumps = [asyncio.create_task(pump(i, q)) for i, q in enumerate(prepared.queues)]
    texts = [""] * len(prepared.queues)
    tokens = [0] * len(prepared.queues)
    open_choices = len(prepared.queues)
    try:
        for index in range(len(prepared.queues)):
            yield chunk(index, {"role": "assistant", "content": ""})
        while open_choices:
            index, delta = await merged.get()
            if delta.error:
                message = f"Generation failed: {delta.error}"
                yield _sse(
                    {"error": {"message": message, "type": "server_error", "param": None, "code": None}}
                )
                return
            tokens[index] = delta.completion_tokens
            if delta.finish_reason is None:
                texts[index] += delta.text
                if delta.text:
                    yield chunk(index, {"content": delta.text})
                continue
            open_choices -= 1
            for piece in _final_pieces(texts[index], delta, request.wants_tools):
                yield chunk(index, piece)
            full, finish = texts[index] + delta.text, delta.finish_reason
            if request.wants_tools and parse_tool_calls(full)[1]:
                finish = "tool_calls"
            yield chunk(index, {}, finish)
        if request.stream_options and request.stream_options.include_usage:
            yield _sse({**base, "choices": [], "usage": usage(prepared.prompt_tokens, sum(tokens))})
        yield b"data: [DONE]\n\n"
    finally:
        prepared.cancel()
        for task in pumps:
            task.cancel()


def _final_pieces(sent: str, last: Delta, wants_tools: bool) -> list[dict[str, Any]]:
    """The deltas that close a choice: held-back text, then its tool calls."""
    full = sent + last.text
    if wants_tools:
        content, calls = parse_tool_calls(full)
        if calls:
            rest = (content or "")[len(sent.strip()) :] if (content or "").startswith(sent.strip()) else ""
            pieces: list[dict[str, Any]] = [{"content": rest}] if rest else []
            pieces += [{"tool_calls": [{"index": i, **call}]} for i, call in enumerate(calls)]
            return pieces
    return [{"content": last.text}] if last.text else []
