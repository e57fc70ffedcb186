"""How conversations, tools and tool calls are written as text for an open model — the same way
the trainer writes them (what a fine-tuned model learns to emit) and the model server reads them.

The base's chat template renders them when it knows tools: the model store's ChatML template
(``services/common/model_store.chatml_template``, used by every built-in base and so by the
trainer) writes each call as ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``.
For a base whose template ignores tools, ``template_messages`` writes the same convention
(Hermes / Qwen 2.5) into plain messages first:

- ``tools`` become a system-prompt section listing each function's JSON schema inside ``<tools>``;
- an assistant tool call is ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``,
  one block per call, after any text content;
- a ``tool`` message becomes a user turn ``<tool_response>\\n...\\n</tool_response>``.

``render_prompt`` builds the prompt; ``parse_tool_calls`` turns generated text back into
``tool_calls``.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)

TOOLS_PROMPT = (
    "You may call one or more functions to assist with the user query. The available functions, "
    "as JSON schemas, are listed within <tools></tools>:\n<tools>\n{tools}\n</tools>\n"
    "To call a function, answer with a JSON object naming it and its arguments inside "
    '<tool_call></tool_call> tags:\n<tool_call>\n{{"name": <function-name>, "arguments": '
    "<args-json-object>}}\n</tool_call>"
)


def content_text(content: Any) -> str:
    """A message's content as plain text (text parts of a multi-part content joined)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        return "".join(str(t) for t in texts)
    return str(content)


def _arguments(raw: Any) -> Any:
    if isinstance(raw, str):
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw
    return raw if raw is not None else {}


def render_tool_call(call: dict[str, Any]) -> str:
    function = call.get("function") or {}
    payload = {"name": function.get("name", ""), "arguments": _arguments(function.get("arguments"))}
    return f"{TOOL_CALL_OPEN}\n{json.dumps(payload, ensure_ascii=False)}\n{TOOL_CALL_CLOSE}"


def assistant_text(message: dict[str, Any]) -> str:
    """What the model emits for an assistant message: its text, then one block per tool call."""
    parts = [content_text(message.get("content"))] if message.get("content") else []
    parts += [render_tool_call(call) for call in message.get("tool_calls") or []]
    if message.get("function_call"):  # the deprecated single-call form
        parts.append(render_tool_call({"function": message["function_call"]}))
    return "\n".join(parts)


def tools_prompt(tools: list[dict[str, Any]]) -> str:
    schemas = [t.get("function", t) for t in tools]
    return TOOLS_PROMPT.format(tools="\n".join(json.dumps(s, ensure_ascii=False) for s in schemas))


def template_messages(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
) -> list[dict[str, str]]:
    """OpenAI chat messages as ``{"role", "content"}`` pairs any chat template can render."""
    out: list[dict[str, str]] = []
    for message in messages:
        role = message.get("role")
        if role == "assistant":
            out.append({"role": "assistant", "content": assistant_text(message)})
        elif role in ("tool", "function"):
            text = content_text(message.get("content"))
            out.append({"role": "user", "content": f"<tool_response>\n{text}\n</tool_response>"})
        elif role == "developer":
            out.append({"role": "system", "content": content_text(message.get("content"))})
        else:
            out.append({"role": str(role), "content": content_text(message.get("content"))})
    if tools:
        section = tools_prompt(tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{section}"}
        else:
            out.insert(0, {"role": "system", "content": section})
    return out


def template_knows_tools(tokenizer: Any) -> bool:
    template = getattr(tokenizer, "chat_template", None) or ""
    return isinstance(template, str) and "tool_call" in template and "tools" in template


def render_prompt(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> str:
    """The prompt text for ``messages`` (and ``tools``), ending where the assistant answers."""
    if template_knows_tools(tokenizer):
        plain = [{**m, "role": "system"} if m.get("role") == "developer" else m for m in messages]
        return tokenizer.apply_chat_template(
            plain, tools=tools or None, tokenize=False, add_generation_prompt=True
        )
    return tokenizer.apply_chat_template(
        template_messages(messages, tools), tokenize=False, add_generation_prompt=True
    )


def parse_tool_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """Split generated text into its plain content and the ``tool_calls`` it holds.

    A block whose JSON does not parse, or lacks a name, stays in the content.
    """
    calls: list[dict[str, Any]] = []
    kept: list[str] = []
    position = 0
    for match in _TOOL_CALL.finditer(text):
        try:
            payload = json.loads(match.group(1))
        except json.JSONDecodeError:
            continue
        if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
            continue
        arguments = payload.get("arguments", {})
        calls.append(
            {
                "id": f"call_{secrets.token_hex(12)}",
                "type": "function",
                "function": {
                    "name": payload["name"],
                    "arguments": arguments
                    if isinstance(arguments, str)
                    else json.dumps(arguments, ensure_ascii=False),
                },
            }
        )
        kept.append(text[position : match.start()])
        position = match.end()
    if not calls:
        return text, []
    kept.append(text[position:])
    content = "".join(kept).strip()
    return content or None, calls
