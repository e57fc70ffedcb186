"""Translate Anthropic Messages API payloads to the OpenAI chat shape.

Used to store Anthropic logs in the shape datasets and training read.
"""

from __future__ import annotations

from typing import Any

import orjson

STOP_REASONS = {"end_turn": "stop", "stop_sequence": "stop", "tool_use": "tool_calls", "max_tokens": "length"}


def text_of_blocks(blocks: Any) -> str:
    if isinstance(blocks, str):
        return blocks
    if isinstance(blocks, list):
        return "".join(b.get("text", "") for b in blocks if isinstance(b, dict) and b.get("type") == "text")
    return ""


def _image_part(block: dict) -> dict:
    source = block.get("source") or {}
    if source.get("type") == "base64":
        url = f"data:{source.get('media_type', 'image/png')};base64,{source.get('data', '')}"
    else:
        url = source.get("url", "")
    return {"type": "image_url", "image_url": {"url": url}}


def tool_call_of_block(block: dict) -> dict:
    arguments = orjson.dumps(block.get("input") or {}).decode()
    return {
        "id": block.get("id", ""),
        "type": "function",
        "function": {"name": block.get("name", ""), "arguments": arguments},
    }


def _convert_message(message: dict) -> list[dict]:
    role = message.get("role", "user")
    content = message.get("content")
    if isinstance(content, str) or content is None:
        return [{"role": role, "content": content or ""}]
    parts: list[dict] = []
    tool_calls: list[dict] = []
    tool_results: list[dict] = []
    for block in content:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            parts.append({"type": "text", "text": block.get("text", "")})
        elif kind == "image":
            parts.append(_image_part(block))
        elif kind == "tool_use":
            tool_calls.append(tool_call_of_block(block))
        elif kind == "tool_result":
            tool_results.append(
                {
                    "role": "tool",
                    "tool_call_id": block.get("tool_use_id", ""),
                    "content": text_of_blocks(block.get("content")),
                }
            )
    out: list[dict] = list(tool_results)
    if role == "assistant":
        text = "".join(p["text"] for p in parts if p["type"] == "text")
        msg: dict[str, Any] = {"role": "assistant", "content": text or None}
        if tool_calls:
            msg["tool_calls"] = tool_calls
        if text or tool_calls:
            out.append(msg)
    elif parts:
        only_text = all(p["type"] == "text" for p in parts)
        out.append({"role": role, "content": "".join(p["text"] for p in parts) if only_text else parts})
    return out


def _tool_choice(choice: Any) -> Any:
    if not isinstance(choice, dict):
        return None
    kind = choice.get("type")
    if kind == "auto":
        return "auto"
    if kind == "any":
        return "required"
    if kind == "none":
        return "none"
    if kind == "tool":
        return {"type": "function", "function": {"name": choice.get("name", "")}}
    return None


def request_to_openai(req: Any) -> Any:
    """An Anthropic ``messages.create`` body as an OpenAI ``chat.completions.create`` body."""
    if not isinstance(req, dict):
        return req
    messages: list[dict] = []
    system = text_of_blocks(req.get("system"))
    if system:
        messages.append({"role": "system", "content": system})
    for message in req.get("messages") or []:
        if isinstance(message, dict):
            messages.extend(_convert_message(message))
    out: dict[str, Any] = {"model": req.get("model"), "messages": messages}
    if req.get("tools"):
        out["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": t.get("name", ""),
                    "description": t.get("description", ""),
                    "parameters": t.get("input_schema") or {},
                },
            }
            for t in req["tools"]
            if isinstance(t, dict)
        ]
    if (choice := _tool_choice(req.get("tool_choice"))) is not None:
        out["tool_choice"] = choice
    for src, dst in (
        ("max_tokens", "max_tokens"),
        ("temperature", "temperature"),
        ("top_p", "top_p"),
        ("stop_sequences", "stop"),
        ("stream", "stream"),
    ):
        if src in req:
            out[dst] = req[src]
    return out


def response_to_openai(resp: Any, created: int = 0) -> Any:
    """An Anthropic ``Message`` as an OpenAI ``chat.completion``; error bodies pass through."""
    if not isinstance(resp, dict) or resp.get("type") != "message":
        return resp
    blocks = resp.get("content") or []
    text = text_of_blocks(blocks)
    tool_calls = [
        tool_call_of_block(b) for b in blocks if isinstance(b, dict) and b.get("type") == "tool_use"
    ]
    message: dict[str, Any] = {"role": "assistant", "content": text or None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    usage = resp.get("usage") or {}
    prompt = int(usage.get("input_tokens") or 0)
    completion = int(usage.get("output_tokens") or 0)
    return {
        "id": resp.get("id", ""),
        "object": "chat.completion",
        "created": created,
        "model": resp.get("model", ""),
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": STOP_REASONS.get(resp.get("stop_reason") or "", "stop"),
            }
        ],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }
