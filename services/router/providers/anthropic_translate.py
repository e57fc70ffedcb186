"""OpenAI Chat Completions <-> Anthropic Messages API, both directions, streaming included.

Pure functions and small state machines, no I/O: the router's ``anthropic:<model>`` route
translates the client's OpenAI body with :func:`to_anthropic_request`, POSTs it to
``/v1/messages`` and translates the answer back with :func:`from_anthropic_response`, or, when
streaming, feeds each parsed SSE event to an :class:`AnthropicStreamTranslator`.

The SSE parser (:mod:`.sse`) and the error types and OpenAI-side helpers (:mod:`.translation`)
are shared with :mod:`services.router.providers.gemini_translate`.

The one-way log normalizer in :mod:`services.common.anthropic_format` is reused for the
Anthropic → OpenAI block helpers, so stored logs and proxied answers look the same.
"""

from __future__ import annotations

import re
from typing import Any

from services.common.anthropic_format import STOP_REASONS, text_of_blocks, tool_call_of_block
from services.router.providers.translation import (
    TranslationError,
    UpstreamStreamError,
    chunk,
    content_parts,
    function_tools,
    image_url_of,
    max_output_tokens,
    openai_usage,
    parse_data_url,
    parse_tool_arguments,
    stop_sequences,
    text_of,
)

DEFAULT_MAX_TOKENS = 4096
JSON_OBJECT_INSTRUCTION = "Respond with a JSON object only."

FINISH_REASONS: dict[str, str] = {**STOP_REASONS, "refusal": "content_filter", "pause_turn": "stop"}

# Anthropic error ``type`` → (HTTP status, OpenAI error type, OpenAI error code), following the
# router's convention (services/router/upstream.py): upstream 5xx → 502, 429 passes through.
_ERROR_TYPES: dict[str, tuple[int, str, str | None]] = {
    "invalid_request_error": (400, "invalid_request_error", None),
    "authentication_error": (401, "upstream_auth_error", "invalid_api_key"),
    "permission_error": (403, "upstream_auth_error", "permission_denied"),
    "not_found_error": (404, "invalid_request_error", "model_not_found"),
    "request_too_large": (413, "invalid_request_error", "request_too_large"),
    "rate_limit_error": (429, "rate_limit_error", "rate_limit_exceeded"),
    "billing_error": (402, "insufficient_quota", "insufficient_quota"),
    "timeout_error": (504, "upstream_error", "upstream_timeout"),
    "api_error": (502, "upstream_error", "upstream_error"),
    "overloaded_error": (502, "upstream_error", "overloaded"),
}

_TOOL_ID_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


# --- errors ------------------------------------------------------------------------------------


def anthropic_error(body: Any, *, status_code: int | None = None) -> UpstreamStreamError:
    """The exception for an Anthropic error object (``{"type": "error", "error": {type, message}}``)."""
    error = body.get("error") if isinstance(body, dict) else None
    error = error if isinstance(error, dict) else {}
    kind = str(error.get("type") or "api_error")
    message = str(error.get("message") or "unknown error")
    status, openai_type, code = _ERROR_TYPES.get(kind, (502, "upstream_error", "upstream_error"))
    if kind not in _ERROR_TYPES and status_code is not None and 400 <= status_code < 500:
        status, openai_type, code = status_code, "invalid_request_error", None
    return UpstreamStreamError(f"anthropic: {message}", status_code=status, type=openai_type, code=code)


# --- request: OpenAI → Anthropic ---------------------------------------------------------------


def _tool_use_id(raw: Any, fallback: str) -> str:
    """Anthropic ids must match ``^[a-zA-Z0-9_-]+$``; OpenAI ids usually do already."""
    cleaned = _TOOL_ID_UNSAFE.sub("_", str(raw or ""))
    return cleaned or fallback


def _text_block(part: dict[str, Any]) -> dict[str, Any] | None:
    text = str(part.get("text") or part.get("refusal") or "")
    if not text:
        return None
    block: dict[str, Any] = {"type": "text", "text": text}
    if part.get("cache_control"):
        block["cache_control"] = part["cache_control"]
    return block


def _user_blocks(content: Any, param: str) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    for j, part in enumerate(content_parts(content)):
        where = f"{param}[{j}]" if isinstance(content, list) else param
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("text", "refusal"):
            if (block := _text_block(part)) is not None:
                blocks.append(block)
        elif kind == "image_url":
            url = image_url_of(part)
            inline = parse_data_url(url, f"{where}.image_url.url")
            source = (
                {"type": "base64", "media_type": inline[0], "data": inline[1]}
                if inline
                else {"type": "url", "url": url}
            )
            blocks.append({"type": "image", "source": source})
        elif kind == "file":
            file = part.get("file") or {}
            inline = parse_data_url(str(file.get("file_data") or ""), f"{where}.file.file_data")
            if inline is None:
                raise TranslationError(
                    f"{where}.file",
                    "Anthropic models accept files only as base64 "
                    "`file_data` data URLs (uploaded file ids are not supported).",
                )
            source = {"type": "base64", "media_type": inline[0], "data": inline[1]}
            blocks.append({"type": "document", "source": source})
        elif kind == "input_audio":
            raise TranslationError(f"{where}.type", "Anthropic models do not accept audio input.")
        else:
            raise TranslationError(
                f"{where}.type", f"Unsupported content part type {kind!r}.", code="invalid_value"
            )
    return blocks


def _tool_result_content(content: Any) -> str | list[dict[str, Any]]:
    if content is None or isinstance(content, str):
        return content or ""
    blocks = [b for p in content_parts(content) if isinstance(p, dict) if (b := _text_block(p))]
    return blocks or ""


def _append(messages: list[dict[str, Any]], role: str, blocks: list[dict[str, Any]]) -> None:
    """Add a turn, merging it into the previous one when the role repeats (Anthropic alternates)."""
    if not blocks:
        return
    if messages and messages[-1]["role"] == role:
        messages[-1]["content"].extend(blocks)
    else:
        messages.append({"role": role, "content": list(blocks)})


def _finish_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for message in messages:
        if message["role"] == "user":
            # tool_result blocks must come first in the user turn that answers tool calls
            message["content"].sort(key=lambda b: b.get("type") != "tool_result")
    if messages and messages[-1]["role"] == "assistant":
        # A final assistant turn is a prefill; Anthropic rejects trailing whitespace there.
        last = messages[-1]["content"]
        if last and last[-1].get("type") == "text":
            last[-1]["text"] = last[-1]["text"].rstrip()
            if not last[-1]["text"]:
                last.pop()
        if not last:
            messages.pop()
    for message in messages:
        blocks = message["content"]
        if len(blocks) == 1 and blocks[0].get("type") == "text" and set(blocks[0]) == {"type", "text"}:
            message["content"] = blocks[0]["text"]
    return messages


def _convert_messages(req: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    system: list[str] = []
    messages: list[dict[str, Any]] = []
    last_calls: list[tuple[str, str]] = []  # (id, name) of the latest assistant turn's tool calls
    answered: set[str] = set()
    legacy = 0
    for i, message in enumerate(req.get("messages") or []):
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            raise TranslationError(param, "Each message must be an object.", code="invalid_type")
        role = message.get("role")
        content = message.get("content")
        if role in ("system", "developer"):
            if text := text_of(content):
                system.append(text)
        elif role == "user":
            _append(messages, "user", _user_blocks(content, f"{param}.content"))
        elif role == "assistant":
            blocks = [b for p in content_parts(content) if isinstance(p, dict) if (b := _text_block(p))]
            calls = []
            for j, call in enumerate(message.get("tool_calls") or []):
                function = call.get("function") or {}
                calls.append(
                    (
                        _tool_use_id(call.get("id"), f"toolu_{i}_{j}"),
                        str(function.get("name") or ""),
                        function.get("arguments"),
                    )
                )
            if isinstance(message.get("function_call"), dict):
                function = message["function_call"]
                calls.append(
                    (f"toolu_legacy_{legacy}", str(function.get("name") or ""), function.get("arguments"))
                )
                legacy += 1
            for call_id, name, arguments in calls:
                blocks.append(
                    {
                        "type": "tool_use",
                        "id": call_id,
                        "name": name,
                        "input": parse_tool_arguments(arguments),
                    }
                )
            if calls:
                last_calls = [(call_id, name) for call_id, name, _ in calls]
                answered = set()
            _append(messages, "assistant", blocks)
        elif role in ("tool", "function"):
            open_calls = [(cid, name) for cid, name in last_calls if cid not in answered]
            if role == "tool" and message.get("tool_call_id"):
                call_id = _tool_use_id(message["tool_call_id"], "")
            else:
                named = [cid for cid, name in open_calls if name == message.get("name")]
                candidates = named or [cid for cid, _ in open_calls]
                if not candidates:
                    raise TranslationError(
                        param,
                        f"A {role!r} message must answer an earlier assistant tool call.",
                        code="invalid_value",
                    )
                call_id = candidates[0]
            answered.add(call_id)
            block = {"type": "tool_result", "tool_use_id": call_id, "content": _tool_result_content(content)}
            _append(messages, "user", [block])
        else:
            raise TranslationError(
                f"{param}.role", f"Unsupported message role {role!r}.", code="invalid_value"
            )
    return system, _finish_messages(messages)


def _tools(req: dict[str, Any]) -> list[dict[str, Any]]:
    tools = []
    for function in function_tools(req):
        entry: dict[str, Any] = {"name": function["name"]}
        if function.get("description"):
            entry["description"] = function["description"]
        entry["input_schema"] = function.get("parameters") or {"type": "object", "properties": {}}
        tools.append(entry)
    return tools


def _tool_choice(req: dict[str, Any]) -> dict[str, Any] | None:
    param = "tool_choice" if req.get("tool_choice") is not None else "function_call"
    choice = req.get(param)
    if choice is None:
        return None
    if choice == "auto":
        return {"type": "auto"}
    if choice in ("required", "any"):
        return {"type": "any"}
    if choice == "none":
        return {"type": "none"}
    if isinstance(choice, dict):
        function = choice.get("function") if choice.get("type") == "function" else choice
        if isinstance(function, dict) and function.get("name"):
            return {"type": "tool", "name": function["name"]}
    raise TranslationError(param, f"Unsupported {param} {choice!r}.", code="invalid_value")


def _reject_unsupported(req: dict[str, Any]) -> None:
    if req.get("n") not in (None, 1):
        raise TranslationError(
            "n", "Anthropic models return a single choice; n must be 1.", code="unsupported_value"
        )
    if req.get("logprobs"):
        raise TranslationError("logprobs", "Anthropic models do not return logprobs.")
    if req.get("top_logprobs"):
        raise TranslationError("top_logprobs", "Anthropic models do not return logprobs.")
    if "audio" in (req.get("modalities") or []):
        raise TranslationError(
            "modalities", "Anthropic models do not produce audio.", code="unsupported_value"
        )
    response_format = req.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
        raise TranslationError(
            "response_format",
            "Anthropic models do not support response_format "
            "json_schema; use json_object or a tool with the schema instead.",
            code="unsupported_value",
        )


def to_anthropic_request(openai_req: dict[str, Any], upstream_model: str) -> dict[str, Any]:
    """An OpenAI ``chat.completions.create`` body as an Anthropic ``messages.create`` body.

    Raises :class:`TranslationError` (a 400 naming the parameter) for what Anthropic cannot do.
    Penalties, ``seed``, ``logit_bias``, ``stream_options`` and Distillery's own fields are dropped.
    """
    req = openai_req
    _reject_unsupported(req)
    system, messages = _convert_messages(req)
    if not messages and system:
        # Anthropic needs at least one message; a system-only prompt ("count to 10") becomes the user turn.
        messages, system = [{"role": "user", "content": "\n\n".join(system)}], []
    response_format = req.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") == "json_object":
        system.append(JSON_OBJECT_INSTRUCTION)

    out: dict[str, Any] = {
        "model": upstream_model,
        "max_tokens": max_output_tokens(req) or DEFAULT_MAX_TOKENS,
    }
    if system:
        out["system"] = "\n\n".join(system)
    out["messages"] = messages
    if tools := _tools(req):
        out["tools"] = tools
        choice = _tool_choice(req)
        if req.get("parallel_tool_calls") is False and (choice or {}).get("type") != "none":
            choice = {**(choice or {"type": "auto"}), "disable_parallel_tool_use": True}
        if choice is not None:
            out["tool_choice"] = choice
    if req.get("temperature") is not None:
        out["temperature"] = min(max(float(req["temperature"]), 0.0), 1.0)
    if req.get("top_p") is not None:
        out["top_p"] = req["top_p"]
    if stops := stop_sequences(req.get("stop")):
        out["stop_sequences"] = stops
    if req.get("stream"):
        out["stream"] = True
    if isinstance(req.get("user"), str) and req["user"]:
        out["metadata"] = {"user_id": req["user"]}
    return out


# --- response: Anthropic → OpenAI --------------------------------------------------------------


def _anthropic_usage(usage: dict[str, Any]) -> dict[str, Any]:
    cache_read = int(usage.get("cache_read_input_tokens") or 0)
    prompt = (
        int(usage.get("input_tokens") or 0) + int(usage.get("cache_creation_input_tokens") or 0) + cache_read
    )
    return openai_usage(prompt, int(usage.get("output_tokens") or 0), cached=cache_read)


def from_anthropic_response(
    resp: dict[str, Any], *, model: str, created: int, completion_id: str | None = None
) -> dict[str, Any]:
    """An Anthropic ``Message`` as an OpenAI ``chat.completion`` named after ``model`` (the client's name).

    The id is ``completion_id`` or else the Anthropic message id. An error object raises
    :class:`UpstreamStreamError`.
    """
    if not isinstance(resp, dict) or resp.get("type") == "error" or "error" in resp:
        raise anthropic_error(resp)
    if resp.get("type") != "message":
        raise UpstreamStreamError("anthropic returned something that is not a message")
    blocks = [b for b in resp.get("content") or [] if isinstance(b, dict)]
    tool_calls = [tool_call_of_block(b) for b in blocks if b.get("type") == "tool_use"]
    has_text = any(b.get("type") == "text" for b in blocks)
    message: dict[str, Any] = {
        "role": "assistant",
        "content": text_of_blocks(blocks) if has_text or not tool_calls else None,
        "refusal": None,
    }
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {
        "id": completion_id or resp.get("id") or "chatcmpl-anthropic",
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": FINISH_REASONS.get(resp.get("stop_reason") or "", "stop"),
            }
        ],
        "usage": _anthropic_usage(resp.get("usage") or {}),
    }


# --- streaming: Anthropic events → OpenAI chunks -----------------------------------------------


class AnthropicStreamTranslator:
    """Anthropic ``messages`` stream events in, OpenAI ``chat.completion.chunk`` dicts out.

    Feed each parsed event's data (``{"type": "message_start", ...}``) to :meth:`feed`. The first
    chunk carries ``delta.role``; text and tool-call argument deltas follow; ``message_delta``
    yields the final chunk with ``finish_reason``. :meth:`usage` / :meth:`usage_chunk` give the
    ``stream_options.include_usage`` tail. An ``error`` event raises :class:`UpstreamStreamError`.
    """

    def __init__(self, model: str, created: int, completion_id: str | None = None) -> None:
        self.model = model
        self.created = created
        self.id = completion_id
        self.finish_reason: str | None = None
        self.finished = False  # message_stop seen
        self._started = False
        self._finish_sent = False
        self._tools: dict[int, int] = {}  # Anthropic content block index → OpenAI tool_calls index
        self._tool_has_args: dict[int, bool] = {}
        self._input = self._output = self._cache_write = self._cache_read = 0

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return chunk(
            self.id or "chatcmpl-anthropic", self.created, self.model, delta, finish_reason=finish_reason
        )

    def _start(self) -> list[dict[str, Any]]:
        if self._started:
            return []
        self._started = True
        return [self._chunk({"role": "assistant", "content": ""})]

    def _count(self, usage: dict[str, Any] | None) -> None:
        usage = usage or {}
        if usage.get("input_tokens") is not None:
            self._input = int(usage["input_tokens"])
        if usage.get("output_tokens") is not None:
            self._output = int(usage["output_tokens"])
        if usage.get("cache_creation_input_tokens") is not None:
            self._cache_write = int(usage["cache_creation_input_tokens"])
        if usage.get("cache_read_input_tokens") is not None:
            self._cache_read = int(usage["cache_read_input_tokens"])

    def _finish(self, reason: str) -> list[dict[str, Any]]:
        if self._finish_sent:
            return []
        self._finish_sent = True
        self.finish_reason = reason
        return [*self._start(), self._chunk({}, finish_reason=reason)]

    def feed(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        kind = event.get("type")
        if kind == "message_start":
            message = event.get("message") or {}
            self.id = self.id or message.get("id")
            self._count(message.get("usage"))
            return self._start()
        if kind == "content_block_start":
            return self._block_start(int(event.get("index") or 0), event.get("content_block") or {})
        if kind == "content_block_delta":
            return self._block_delta(int(event.get("index") or 0), event.get("delta") or {})
        if kind == "content_block_stop":
            index = int(event.get("index") or 0)
            if index in self._tools and not self._tool_has_args[index]:
                # a tool without arguments streams no JSON at all; OpenAI clients expect "{}"
                self._tool_has_args[index] = True
                return [
                    self._chunk(
                        {"tool_calls": [{"index": self._tools[index], "function": {"arguments": "{}"}}]}
                    )
                ]
            return []
        if kind == "message_delta":
            self._count(event.get("usage"))
            stop_reason = (event.get("delta") or {}).get("stop_reason")
            return self._finish(FINISH_REASONS.get(stop_reason, "stop")) if stop_reason else []
        if kind == "message_stop":
            self.finished = True
            return self._finish("stop")
        if kind == "error":
            raise anthropic_error(event)
        return []  # ping and event types added later

    def _block_start(self, index: int, block: dict[str, Any]) -> list[dict[str, Any]]:
        out = self._start()
        if block.get("type") == "text" and block.get("text"):
            out.append(self._chunk({"content": block["text"]}))
        elif block.get("type") == "tool_use":
            position = len(self._tools)
            self._tools[index] = position
            self._tool_has_args[index] = False
            call = {
                "index": position,
                "id": block.get("id", ""),
                "type": "function",
                "function": {"name": block.get("name", ""), "arguments": ""},
            }
            out.append(self._chunk({"tool_calls": [call]}))
        return out

    def _block_delta(self, index: int, delta: dict[str, Any]) -> list[dict[str, Any]]:
        out = self._start()
        if delta.get("type") == "text_delta" and delta.get("text"):
            out.append(self._chunk({"content": delta["text"]}))
        elif delta.get("type") == "input_json_delta" and delta.get("partial_json") and index in self._tools:
            self._tool_has_args[index] = True
            out.append(
                self._chunk(
                    {
                        "tool_calls": [
                            {"index": self._tools[index], "function": {"arguments": delta["partial_json"]}}
                        ]
                    }
                )
            )
        return out  # thinking, signature and citation deltas have no OpenAI equivalent

    def finish(self) -> list[dict[str, Any]]:
        """Call when the upstream stream ends; raises if it ended before ``message_stop``."""
        if not self.finished:
            raise UpstreamStreamError("anthropic stream ended before message_stop")
        return []

    def usage(self) -> dict[str, Any]:
        prompt = self._input + self._cache_write + self._cache_read
        return openai_usage(prompt, self._output, cached=self._cache_read)

    def usage_chunk(self) -> dict[str, Any]:
        """The ``choices: []`` chunk OpenAI sends last when ``stream_options.include_usage`` is set."""
        return {
            "id": self.id or "chatcmpl-anthropic",
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": self.usage(),
        }
