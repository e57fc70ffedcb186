"""Pruning rules: static prompt text a fine-tuned model was trained without, removed from requests."""

from __future__ import annotations

from typing import Any


def _prune_text(text: str, rules: tuple[str, ...]) -> str:
    for rule in rules:
        if rule:
            text = text.replace(rule, "")
    return text


def _prune_content(content: Any, rules: tuple[str, ...]) -> Any:
    if isinstance(content, str):
        return _prune_text(content, rules)
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text":
                text = _prune_text(part.get("text") or "", rules)
                if text:
                    parts.append({**part, "text": text})
            else:
                parts.append(part)
        return parts
    return content


def apply_pruning_rules(messages: list[dict[str, Any]], rules: tuple[str, ...]) -> list[dict[str, Any]]:
    """Remove each rule's text, in order, from every message; drop messages left empty
    unless they carry tool calls."""
    if not rules:
        return messages
    pruned = []
    for message in messages:
        content = _prune_content(message.get("content"), rules)
        empty = content in ("", []) or (isinstance(content, str) and not content.strip())
        if empty and not (message.get("tool_calls") or message.get("function_call")):
            continue
        pruned.append({**message, "content": content})
    return pruned
