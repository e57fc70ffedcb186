"""Server-sent events for chat completions: merge chunks into one completion, replay one as chunks."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import orjson

DONE = b"data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


async def without_usage(chunks: AsyncGenerator[dict[str, Any], None]) -> AsyncGenerator[dict[str, Any], None]:
    """A stream as a client that did not set ``stream_options.include_usage`` expects it: no usage
    tail chunk (``choices: []``) and no ``usage`` field; the router itself asked for them."""
    try:
        async for chunk in chunks:
            if "usage" in chunk:
                if not chunk.get("choices"):
                    continue
                chunk = {k: v for k, v in chunk.items() if k != "usage"}
            yield chunk
    finally:
        await chunks.aclose()  # the relay logs the call when it closes


def _merge_tool_calls(target: list[dict], deltas: list[dict]) -> None:
    for delta in deltas:
        index = delta.get("index", len(target))
        while len(target) <= index:
            target.append({"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
        call = target[index]
        if delta.get("id"):
            call["id"] = delta["id"]
        function = delta.get("function") or {}
        if function.get("name"):
            call["function"]["name"] += function["name"]
        if function.get("arguments"):
            call["function"]["arguments"] += function["arguments"]


def merge_chunks(chunks: list[dict[str, Any]]) -> dict[str, Any] | None:
    """One ``chat.completion`` equivalent to a streamed answer (for logs and the cache)."""
    if not chunks:
        return None
    first = chunks[0]
    choices: dict[int, dict[str, Any]] = {}
    usage = None
    for chunk in chunks:
        usage = chunk.get("usage") or usage
        for choice in chunk.get("choices") or []:
            merged = choices.setdefault(
                choice.get("index", 0),
                {
                    "index": choice.get("index", 0),
                    "message": {"role": "assistant", "content": None},
                    "finish_reason": None,
                },
            )
            delta = choice.get("delta") or {}
            if delta.get("content"):
                merged["message"]["content"] = (merged["message"]["content"] or "") + delta["content"]
            if delta.get("refusal"):
                merged["message"]["refusal"] = merged["message"].get("refusal", "") + delta["refusal"]
            if delta.get("tool_calls"):
                _merge_tool_calls(merged["message"].setdefault("tool_calls", []), delta["tool_calls"])
            if choice.get("finish_reason"):
                merged["finish_reason"] = choice["finish_reason"]
            if choice.get("logprobs") and choice["logprobs"].get("content"):
                merged.setdefault("logprobs", {"content": []})["content"] += choice["logprobs"]["content"]
    completion = {
        "id": first.get("id", ""),
        "object": "chat.completion",
        "created": first.get("created", 0),
        "model": first.get("model", ""),
        "choices": [choices[i] for i in sorted(choices)],
    }
    if first.get("system_fingerprint"):
        completion["system_fingerprint"] = first["system_fingerprint"]
    if usage:
        completion["usage"] = usage
    return completion


def completion_to_chunks(
    completion: dict[str, Any], *, include_usage: bool, piece: int = 24
) -> list[dict[str, Any]]:
    """Replay a whole completion as a stream (cache hits, mixture-of-agents answers)."""
    base = {
        "id": completion.get("id", ""),
        "object": "chat.completion.chunk",
        "created": completion.get("created", 0),
        "model": completion.get("model", ""),
    }
    chunks: list[dict[str, Any]] = []
    for choice in completion.get("choices") or []:
        index = choice.get("index", 0)
        message = choice.get("message") or {}
        chunks.append(
            {
                **base,
                "choices": [
                    {"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                ],
            }
        )
        content = message.get("content") or ""
        for start in range(0, len(content), piece):
            chunks.append(
                {
                    **base,
                    "choices": [
                        {
                            "index": index,
                            "delta": {"content": content[start : start + piece]},
                            "finish_reason": None,
                        }
                    ],
                }
            )
        for i, call in enumerate(message.get("tool_calls") or []):
            chunks.append(
                {
                    **base,
                    "choices": [
                        {
                            "index": index,
                            "finish_reason": None,
                            "delta": {
                                "tool_calls": [
                                    {
                                        "index": i,
                                        "id": call.get("id", ""),
                                        "type": "function",
                                        "function": call.get("function"),
                                    }
                                ]
                            },
                        }
                    ],
                }
            )
        chunks.append(
            {
                **base,
                "choices": [
                    {"index": index, "delta": {}, "finish_reason": choice.get("finish_reason") or "stop"}
                ],
            }
        )
    if include_usage and completion.get("usage"):
        chunks.append({**base, "choices": [], "usage": completion["usage"]})
    return chunks
