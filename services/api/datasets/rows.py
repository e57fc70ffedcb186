"""One dataset row, from whatever a client sends to what we store: validation and normalization.

Accepts the OpenAI chat fine-tuning format (``messages`` ending with the assistant output,
``tools``/``tool_choice``, legacy ``functions``/``function_call``) plus ``split``,
``rejected_message`` and ``metadata``. Shared by the entries API, JSONL upload and log import.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import orjson

ROLES = ("system", "developer", "user", "assistant", "tool", "function")
SPLITS = ("TRAIN", "TEST")
TEST_SHARE_PER_TEN = 1  # unset splits land 90:10 TRAIN:TEST


class EntryError(ValueError):
    """Why a row cannot become an entry; the message is shown to the client as is."""


@dataclass
class EntryDraft:
    messages: list[dict[str, Any]]
    output: dict[str, Any]
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    rejected_message: dict[str, Any] | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    split: str = "TRAIN"
    content_hash: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0


def estimate_tokens(value: Any) -> int:
    """~4 characters per token: a tokenizer-free estimate, good enough for totals and savings."""
    if value is None:
        return 0
    text = value if isinstance(value, str) else orjson.dumps(value).decode()
    return (len(text) + 3) // 4


def content_hash(
    messages: list[dict[str, Any]], tools: Any, tool_choice: Any, response_format: Any, output: dict[str, Any]
) -> str:
    canonical = orjson.dumps(
        {
            "messages": messages,
            "tools": tools,
            "tool_choice": tool_choice,
            "response_format": response_format,
            "output": output,
        },
        option=orjson.OPT_SORT_KEYS,
    )
    return hashlib.sha256(canonical).hexdigest()


def automatic_split(hash_hex: str) -> str:
    """Deterministic 90:10 by the entry's content: the same row always lands in the same split."""
    return "TEST" if int(hash_hex[:8], 16) % 10 < TEST_SHARE_PER_TEN else "TRAIN"


def _legacy_to_tools(row: dict[str, Any]) -> tuple[Any, Any]:
    tools, tool_choice = row.get("tools"), row.get("tool_choice")
    if tools is None and row.get("functions") is not None:
        if not isinstance(row["functions"], list):
            raise EntryError("functions must be a list")
        tools = [{"type": "function", "function": f} for f in row["functions"]]
    if tool_choice is None and row.get("function_call") is not None:
        call = row["function_call"]
        tool_choice = (
            call if isinstance(call, str) else {"type": "function", "function": {"name": call.get("name")}}
        )
    return tools, tool_choice


def _normalize_message(message: Any, index: int) -> dict[str, Any]:
    if not isinstance(message, dict):
        raise EntryError(f"messages[{index}] must be an object")
    role = message.get("role")
    if role not in ROLES:
        raise EntryError(f"messages[{index}].role must be one of {', '.join(ROLES)}")
    out = dict(message)
    if role == "assistant" and out.get("function_call") and not out.get("tool_calls"):
        call = out.pop("function_call")
        out["tool_calls"] = [{"id": "", "type": "function", "function": call}]
    if role == "function":  # legacy function result → tool message
        out = {"role": "tool", "tool_call_id": out.get("name", ""), "content": out.get("content")}
    if "content" not in out:
        if not out.get("tool_calls"):
            raise EntryError(f"messages[{index}] needs content")
        out["content"] = None
    content = out.get("content")
    if content is not None and not isinstance(content, str | list):
        raise EntryError(f"messages[{index}].content must be a string, a list of parts or null")
    return out


def _string_map(value: Any, what: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise EntryError(f"Input validation failed: {what} must be an object of string values")
    return dict(value)


def parse_entry(row: Any) -> EntryDraft:
    """Validate one row and split it into input and output; raises EntryError naming the problem."""
    if not isinstance(row, dict):
        raise EntryError("each entry must be a JSON object")
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise EntryError("messages is required and must be a non-empty list")
    normalized = [_normalize_message(m, i) for i, m in enumerate(messages)]
    output = normalized[-1]
    if output["role"] != "assistant":
        raise EntryError("the last message must be the assistant output (role 'assistant')")
    if len(normalized) < 2:
        raise EntryError("messages needs at least one input message before the assistant output")
    tools, tool_choice = _legacy_to_tools(row)
    if tools is not None and not isinstance(tools, list):
        raise EntryError("tools must be a list")
    rejected = row.get("rejected_message")
    if rejected is not None:
        rejected = _normalize_message(rejected, len(normalized))
        if rejected["role"] != "assistant":
            raise EntryError("rejected_message must be an assistant message")
    split = row.get("split")
    if split is not None and split not in SPLITS:
        raise EntryError("split must be 'TRAIN' or 'TEST'")
    response_format = row.get("response_format")
    if response_format is not None and not isinstance(response_format, dict):
        raise EntryError("response_format must be an object")
    inputs = normalized[:-1]
    digest = content_hash(inputs, tools, tool_choice, response_format, output)
    return EntryDraft(
        messages=inputs,
        output=output,
        tools=tools,
        tool_choice=tool_choice,
        response_format=response_format,
        rejected_message=rejected,
        metadata=_string_map(row.get("metadata"), "metadata"),
        split=split or automatic_split(digest),
        content_hash=digest,
        prompt_tokens=estimate_tokens(inputs) + estimate_tokens(tools),
        output_tokens=estimate_tokens(output),
    )


def to_training_row(
    *,
    messages: list[dict[str, Any]],
    output: dict[str, Any],
    tools: Any = None,
    tool_choice: Any = None,
    response_format: Any = None,
    rejected_message: Any = None,
    split: str | None = None,
    metadata: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The export/snapshot line: the OpenAI fine-tuning format plus our fields. Re-imports identically."""
    line: dict[str, Any] = {"messages": [*messages, output]}
    for key, value in (
        ("tools", tools),
        ("tool_choice", tool_choice),
        ("response_format", response_format),
        ("rejected_message", rejected_message),
    ):
        if value is not None:
            line[key] = value
    if split is not None:
        line["split"] = split
    line["metadata"] = metadata or {}
    return line
