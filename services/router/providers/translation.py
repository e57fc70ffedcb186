"""What every OpenAI → provider translation shares: its errors and the OpenAI-side helpers
(message content, tool arguments, usage and chunk shapes) that Anthropic and Gemini both use."""

from __future__ import annotations

from typing import Any

import orjson

from services.common.errors import APIError
from services.router.upstream import UpstreamError


class TranslationError(APIError):
    """The caller explicitly asked for something the upstream API cannot do: a 400 naming ``param``."""

    def __init__(self, param: str, message: str, *, code: str = "unsupported_parameter") -> None:
        super().__init__(400, message, type="invalid_request_error", param=param, code=code)


class UpstreamStreamError(UpstreamError):
    """An upstream reported an error inside a stream (or an error body where a result was due)."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int = 502,
        type: str = "upstream_error",
        code: str | None = "upstream_error",
    ) -> None:
        super().__init__(status_code, message, type=type, code=code)


def parse_data_url(url: str, param: str) -> tuple[str, str] | None:
    """``data:<media>;base64,<data>`` → (media type, base64 data); None for any other URL."""
    if not url.startswith("data:"):
        return None
    header, comma, data = url[5:].partition(",")
    if not comma or ";base64" not in header:
        raise TranslationError(
            param, "Only base64 data URLs are supported for inline content.", code="invalid_value"
        )
    media_type = header.split(";", 1)[0] or "application/octet-stream"
    return media_type, data


def parse_tool_arguments(arguments: Any) -> dict[str, Any]:
    """OpenAI ``function.arguments`` (a JSON string) as an object; unparseable text kept as ``_raw``."""
    if isinstance(arguments, dict):
        return arguments
    if arguments is None or (isinstance(arguments, str) and not arguments.strip()):
        return {}
    try:
        parsed = orjson.loads(arguments)
    except (orjson.JSONDecodeError, TypeError):
        return {"_raw": str(arguments)}
    return parsed if isinstance(parsed, dict) else {"_raw": str(arguments)}


def content_parts(content: Any) -> list[dict[str, Any]]:
    """OpenAI message ``content`` (string, part list or None) as a list of parts."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, list):
        return [{"type": "text", "text": p} if isinstance(p, str) else p for p in content if p is not None]
    return [{"type": "text", "text": str(content)}]


def text_of(content: Any) -> str:
    """The text of OpenAI message ``content`` (text and refusal parts joined)."""
    return "".join(
        str(p.get("text") or p.get("refusal") or "")
        for p in content_parts(content)
        if isinstance(p, dict) and p.get("type") in ("text", "refusal")
    )


def image_url_of(part: dict[str, Any]) -> str:
    image = part.get("image_url")
    return str(image.get("url") or "") if isinstance(image, dict) else str(image or "")


def stop_sequences(stop: Any) -> list[str]:
    if stop is None:
        return []
    items = [stop] if isinstance(stop, str) else list(stop)
    return [s for s in items if isinstance(s, str) and s]


def max_output_tokens(req: dict[str, Any]) -> int | None:
    for param in ("max_completion_tokens", "max_tokens"):
        value = req.get(param)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise TranslationError(param, f"{param} must be a positive integer.", code="invalid_value")
        return value
    return None


def openai_usage(
    prompt: int, completion: int, *, cached: int = 0, reasoning: int | None = None, total: int | None = None
) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": total if total is not None else prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }
    if reasoning is not None:
        usage["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    return usage


def chunk(
    completion_id: str,
    created: int,
    model: str,
    delta: dict[str, Any],
    *,
    index: int = 0,
    finish_reason: str | None = None,
) -> dict[str, Any]:
    """One OpenAI ``chat.completion.chunk`` with a single choice."""
    return {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }


def function_tools(req: dict[str, Any]) -> list[dict[str, Any]]:
    """The request's functions (``tools``, or legacy ``functions``), checked; shared with Gemini."""
    if req.get("tools"):
        param, entries = "tools", list(req["tools"])
    elif req.get("functions"):
        param, entries = "functions", [{"type": "function", "function": f} for f in req["functions"]]
    else:
        return []
    functions = []
    for i, tool in enumerate(entries):
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else type(tool).__name__
            raise TranslationError(f"{param}[{i}].type", f"Only function tools are supported, not {kind!r}.")
        function = tool.get("function") or {}
        if not function.get("name"):
            raise TranslationError(
                f"{param}[{i}].function.name", "Every tool needs a name.", code="invalid_value"
            )
        functions.append(function)
    return functions
