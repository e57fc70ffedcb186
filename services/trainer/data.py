"""Training data: dataset snapshot rows → SFT and DPO examples, tokenized with the base's chat template.

A snapshot line (``services/api/dataset_files``) is the OpenAI fine-tuning format plus our fields:
``{"messages": [..., output], "tools"?, "rejected_message"?, "split"?, "metadata", "entry_id"}``.
Only ``TRAIN`` rows are trained on; a validation file's rows all count, whatever their split. The
loss covers assistant tokens only: the template's ``{% generation %}`` marks them, or, for a
template without marks, each assistant turn is found as the difference between the conversation
rendered up to it and up to the turn before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import orjson

from services.common.pruning import apply_pruning_rules

IGNORE = -100
# OpenAI's defaults: about 100 example passes at least, 25,000 at most, 3 epochs otherwise.
MIN_EXAMPLE_PASSES = 100
MAX_EXAMPLE_PASSES = 25_000
DEFAULT_EPOCHS = 3
MAX_EPOCHS = 25


class DataError(ValueError):
    """The dataset cannot be trained on; the message says why (shown to the user)."""

    def __init__(self, message: str, code: str = "invalid_training_data") -> None:
        super().__init__(message)
        self.code = code


@dataclass
class TrainingRows:
    sft: list[dict[str, Any]] = field(default_factory=list)  # {"messages", "tools"}
    dpo: list[dict[str, Any]] = field(default_factory=list)  # {"prompt", "chosen", "rejected", "tools"}
    skipped: int = 0
    total: int = 0


def parse_snapshot(
    data: bytes, rules: list[str] | tuple[str, ...] = (), *, every_split: bool = False
) -> TrainingRows:
    """Read a snapshot's JSONL, keep TRAIN rows (every row with ``every_split``: a validation file)
    whose last message is a usable assistant output."""
    rows = TrainingRows()
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        rows.total += 1
        try:
            row = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise DataError(f"snapshot line {number} is not valid JSON: {exc}") from None
        if not isinstance(row, dict):
            rows.skipped += 1
            continue
        if not every_split and str(row.get("split") or "TRAIN").upper() != "TRAIN":
            continue
        example = _example(row, tuple(rules))
        if example is None:
            rows.skipped += 1
            continue
        rows.sft.append({"messages": example["messages"], "tools": example["tools"]})
        rejected = _assistant(row.get("rejected_message"))
        if rejected is not None:
            rows.dpo.append(
                {
                    "prompt": example["messages"][:-1],
                    "chosen": [example["messages"][-1]],
                    "rejected": [rejected],
                    "tools": example["tools"],
                }
            )
    return rows


def _example(row: dict[str, Any], rules: tuple[str, ...]) -> dict[str, Any] | None:
    messages = row.get("messages")
    if not isinstance(messages, list) or len(messages) < 2 or not all(isinstance(m, dict) for m in messages):
        return None
    output = _assistant(messages[-1])
    if output is None:
        return None
    prompt = [_clean(m) for m in apply_pruning_rules(messages[:-1], rules)]
    if not prompt:
        return None
    tools = row.get("tools") if isinstance(row.get("tools"), list) and row.get("tools") else None
    return {"messages": [*prompt, output], "tools": tools}


def _assistant(message: Any) -> dict[str, Any] | None:
    """An assistant message with content or tool calls, or None."""
    if not isinstance(message, dict) or message.get("role", "assistant") != "assistant":
        return None
    content = _text(message.get("content"))
    calls = message.get("tool_calls") or None
    if not content and not calls:
        return None
    out: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        out["tool_calls"] = calls
    return out


def _clean(message: dict[str, Any]) -> dict[str, Any]:
    out = {"role": str(message.get("role") or "user"), "content": _text(message.get("content"))}
    for key in ("tool_calls", "tool_call_id", "name"):
        if message.get(key):
            out[key] = message[key]
    return out


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            p.get("text") or "" for p in content if isinstance(p, dict) and p.get("type") == "text"
        )
    return ""


def default_epochs(rows: int) -> int:
    """Epochs from the row count: 3, more for small sets (≥100 example passes), fewer for huge ones."""
    if rows <= 0:
        return DEFAULT_EPOCHS
    if rows * DEFAULT_EPOCHS < MIN_EXAMPLE_PASSES:
        return min(MAX_EPOCHS, math.ceil(MIN_EXAMPLE_PASSES / rows))
    if rows * DEFAULT_EPOCHS > MAX_EXAMPLE_PASSES:
        return max(1, MAX_EXAMPLE_PASSES // rows)
    return DEFAULT_EPOCHS


def auto_batch_size(lengths: list[int], token_budget: int, min_steps_per_epoch: int = 8) -> int:
    """Rows per step: about ``token_budget`` tokens a step, and at least a few steps an epoch."""
    if not lengths:
        return 1
    mean = sum(lengths) / len(lengths)
    by_tokens = int(token_budget // max(mean, 1))
    return max(1, min(64, by_tokens, len(lengths) // min_steps_per_epoch))


def tokenize_sft(tokenizer: Any, example: dict[str, Any], max_length: int) -> dict[str, list[int]]:
    """``input_ids`` and ``labels`` (assistant tokens; the rest ``IGNORE``), cut to ``max_length``."""
    messages, tools = example["messages"], example.get("tools")
    template = tokenizer.chat_template or ""
    if "{% generation %}" in template or "{%- generation %}" in template:
        encoded = tokenizer.apply_chat_template(
            messages, tools=tools, return_dict=True, return_assistant_tokens_mask=True
        )
        ids = list(encoded["input_ids"])
        mask = list(encoded["assistant_masks"])
    else:
        ids, mask = _masked_by_prefix(tokenizer, messages, tools)
    ids, mask = ids[:max_length], mask[:max_length]
    labels = [t if m else IGNORE for t, m in zip(ids, mask, strict=True)]
    return {"input_ids": ids, "labels": labels}


def _masked_by_prefix(tokenizer: Any, messages: list[dict], tools: Any) -> tuple[list[int], list[int]]:
    def render(upto: int, prompt: bool) -> list[int]:
        return list(
            tokenizer.apply_chat_template(
                messages[:upto], tools=tools, add_generation_prompt=prompt, tokenize=True, return_dict=True
            )["input_ids"]
        )

    ids = render(len(messages), False)
    mask = [0] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start, end = len(render(i, True)), len(render(i + 1, False))
        for j in range(start, min(end, len(ids))):
            mask[j] = 1
    return ids, mask
