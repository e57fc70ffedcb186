"""OpenAI Chat Completions <-> Google Gemini ``generateContent``, both directions, streaming included.

Pure functions and a small state machine, no I/O. The router's ``gemini:<model>`` route POSTs
:func:`to_gemini_request`'s body to ``/v1beta/models/<model>:generateContent`` (or
``:streamGenerateContent?alt=sse``; the model lives in the URL, not the body) and translates the
answer with :func:`from_gemini_response`, or each SSE ``data:`` object with a
:class:`GeminiStreamTranslator`.

Gemini has no tool-call ids: generated ones are ``call_<n>`` (numbered per response), and a
``tool`` message finds its function name through the earlier assistant ``tool_calls`` entry
with the same id. Gemini 2.5+/3 ``thoughtSignature`` values ride along on a tool call as
``extra_content.google.thought_signature`` (as in Google's own OpenAI-compatible endpoint) and
go back upstream when the client returns them.
"""

from __future__ import annotations

import mimetypes
from typing import Any

import orjson

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

__all__ = [
    "GeminiStreamTranslator",
    "clean_schema",
    "from_gemini_response",
    "gemini_error",
    "to_gemini_request",
]

FINISH_REASONS: dict[str, str] = {
    "STOP": "stop",
    "MAX_TOKENS": "length",
    "SAFETY": "content_filter",
    "RECITATION": "content_filter",
    "BLOCKLIST": "content_filter",
    "PROHIBITED_CONTENT": "content_filter",
    "SPII": "content_filter",
    "IMAGE_SAFETY": "content_filter",
}

# google.rpc status → (HTTP status, OpenAI error type, code); upstream 5xx → 502 like the router.
_ERROR_STATUSES: dict[str, tuple[int, str, str | None]] = {
    "INVALID_ARGUMENT": (400, "invalid_request_error", None),
    "FAILED_PRECONDITION": (400, "invalid_request_error", None),
    "OUT_OF_RANGE": (400, "invalid_request_error", None),
    "UNAUTHENTICATED": (401, "upstream_auth_error", "invalid_api_key"),
    "PERMISSION_DENIED": (403, "upstream_auth_error", "permission_denied"),
    "NOT_FOUND": (404, "invalid_request_error", "model_not_found"),
    "RESOURCE_EXHAUSTED": (429, "rate_limit_error", "rate_limit_exceeded"),
    "INTERNAL": (502, "upstream_error", "upstream_error"),
    "UNAVAILABLE": (502, "upstream_error", "overloaded"),
    "DEADLINE_EXCEEDED": (504, "upstream_error", "upstream_timeout"),
}

# Keys of Gemini's OpenAPI-subset ``Schema``; everything else ($schema, additionalProperties,
# title, default, examples, strict, ...) is rejected by some Gemini versions, so it is dropped.
_SCHEMA_KEYS = (
    "type",
    "format",
    "description",
    "nullable",
    "enum",
    "maxItems",
    "minItems",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "pattern",
    "minProperties",
    "maxProperties",
    "propertyOrdering",
)
_FORMATS = {"string": {"enum", "date-time"}, "integer": {"int32", "int64"}, "number": {"float", "double"}}


# --- errors ------------------------------------------------------------------------------------


def gemini_error(body: Any, *, status_code: int | None = None) -> UpstreamStreamError:
    """The exception for a Gemini error body (``{"error": {code, message, status}}``)."""
    if isinstance(body, list) and body and isinstance(body[0], dict):
        body = body[0]
    error = body.get("error") if isinstance(body, dict) else None
    error = error if isinstance(error, dict) else {}
    status = str(error.get("status") or "")
    message = str(error.get("message") or "unknown error")
    reasons = {d.get("reason") for d in error.get("details") or [] if isinstance(d, dict)}
    if "API_KEY_INVALID" in reasons:
        http, kind, code = 401, "upstream_auth_error", "invalid_api_key"
    elif status in _ERROR_STATUSES:
        http, kind, code = _ERROR_STATUSES[status]
    else:
        http = int(error.get("code") or status_code or 502)
        http, kind, code = (
            (http, "invalid_request_error", None)
            if 400 <= http < 500
            else (502, "upstream_error", "upstream_error")
        )
    return UpstreamStreamError(f"gemini: {message}", status_code=http, type=kind, code=code)


# --- JSON schema → Gemini Schema ---------------------------------------------------------------


def clean_schema(schema: Any, *, _defs: dict[str, Any] | None = None, _depth: int = 0) -> dict[str, Any]:
    """A JSON schema reduced to what Gemini's ``Schema`` accepts: local ``$ref`` inlined, nullable
    unions folded into ``nullable``, ``const`` as a one-value ``enum``, unsupported keys dropped."""
    if not isinstance(schema, dict) or _depth > 24:
        return {}
    defs = (
        _defs if _defs is not None else {**(schema.get("definitions") or {}), **(schema.get("$defs") or {})}
    )
    ref = schema.get("$ref")
    if isinstance(ref, str):
        target = defs.get(ref.rsplit("/", 1)[-1]) if ref.startswith("#/") else None
        rest = {k: v for k, v in schema.items() if k != "$ref"}
        return clean_schema({**(target or {"type": "object"}), **rest}, _defs=defs, _depth=_depth + 1)
    all_of = schema.get("allOf")
    if isinstance(all_of, list) and len(all_of) == 1:
        rest = {k: v for k, v in schema.items() if k != "allOf"}
        return clean_schema({**all_of[0], **rest}, _defs=defs, _depth=_depth + 1)

    nullable = bool(schema.get("nullable"))
    types = schema.get("type")
    if isinstance(types, list):
        kept = [t for t in types if t != "null"]
        nullable = nullable or len(kept) < len(types)
        types = kept[0] if len(kept) == 1 else None
        if len(kept) > 1:
            variants = [clean_schema({**schema, "type": t}, _defs=defs, _depth=_depth + 1) for t in kept]
            return {"anyOf": variants, **({"nullable": True} if nullable else {})}
    union = schema.get("anyOf") or schema.get("oneOf")
    if isinstance(union, list):
        variants = [v for v in union if not (isinstance(v, dict) and v.get("type") == "null")]
        nullable = nullable or len(variants) < len(union)
        rest = {k: v for k, v in schema.items() if k not in ("anyOf", "oneOf")}
        if len(variants) == 1 and isinstance(variants[0], dict):
            merged = clean_schema({**variants[0], **rest}, _defs=defs, _depth=_depth + 1)
            return {**merged, "nullable": True} if nullable else merged
        out = clean_schema(rest, _defs=defs, _depth=_depth + 1)
        out["anyOf"] = [clean_schema(v, _defs=defs, _depth=_depth + 1) for v in variants]
        if nullable:
            out["nullable"] = True
        return out

    out: dict[str, Any] = {}
    for key in _SCHEMA_KEYS:
        if key in schema and key != "type":
            out[key] = schema[key]
    if types is not None:
        out["type"] = types
    if "const" in schema and "enum" not in out:
        out["enum"] = [schema["const"]]
        out.setdefault("type", "string")
    fmt = out.get("format")
    if fmt is not None and fmt not in _FORMATS.get(str(out.get("type", "")).lower(), set()):
        del out["format"]
    if isinstance(schema.get("properties"), dict):
        out["properties"] = {
            k: clean_schema(v, _defs=defs, _depth=_depth + 1) for k, v in schema["properties"].items()
        }
        if isinstance(schema.get("required"), list):
            out["required"] = [r for r in schema["required"] if r in out["properties"]]
    if isinstance(schema.get("items"), dict):
        out["items"] = clean_schema(schema["items"], _defs=defs, _depth=_depth + 1)
    if nullable:
        out["nullable"] = True
    return out


# --- request: OpenAI → Gemini ------------------------------------------------------------------


def _text_part(part: dict[str, Any]) -> dict[str, Any] | None:
    text = str(part.get("text") or part.get("refusal") or "")
    return {"text": text} if text else None


def _user_parts(content: Any, param: str) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content_parts(content)):
        where = f"{param}[{j}]" if isinstance(content, list) else param
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("text", "refusal"):
            if (text := _text_part(part)) is not None:
                parts.append(text)
        elif kind == "image_url":
            url = image_url_of(part)
            inline = parse_data_url(url, f"{where}.image_url.url")
            if inline:
                parts.append({"inlineData": {"mimeType": inline[0], "data": inline[1]}})
            else:
                mime = mimetypes.guess_type(url.split("?", 1)[0])[0] or "image/jpeg"
                parts.append({"fileData": {"mimeType": mime, "fileUri": url}})
        elif kind == "input_audio":
            audio = part.get("input_audio") or {}
            fmt = str(audio.get("format") or "wav")
            mime = {"mp3": "audio/mp3", "wav": "audio/wav"}.get(fmt, f"audio/{fmt}")
            parts.append({"inlineData": {"mimeType": mime, "data": audio.get("data", "")}})
        elif kind == "file":
            file = part.get("file") or {}
            inline = parse_data_url(str(file.get("file_data") or ""), f"{where}.file.file_data")
            if inline is None:
                raise TranslationError(
                    f"{where}.file",
                    "Gemini models accept files only as base64 `file_data` "
                    "data URLs (uploaded file ids are not supported).",
                )
            parts.append({"inlineData": {"mimeType": inline[0], "data": inline[1]}})
        else:
            raise TranslationError(
                f"{where}.type", f"Unsupported content part type {kind!r}.", code="invalid_value"
            )
    return parts


def _function_response(name: str, content: Any) -> dict[str, Any]:
    text = content if isinstance(content, str) else text_of(content)
    try:
        parsed = orjson.loads(text) if text.strip() else None
    except orjson.JSONDecodeError:
        parsed = None
    response = parsed if isinstance(parsed, dict) else {"content": text}
    return {"functionResponse": {"name": name, "response": response}}


def _append(contents: list[dict[str, Any]], role: str, parts: list[dict[str, Any]]) -> None:
    if not parts:
        return
    if contents and contents[-1]["role"] == role:
        contents[-1]["parts"].extend(parts)
    else:
        contents.append({"role": role, "parts": list(parts)})


def _convert_messages(req: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    system: list[str] = []
    contents: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # tool call id → function name (latest assistant turn wins)
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
            _append(contents, "user", _user_parts(content, f"{param}.content"))
        elif role == "assistant":
            parts = [
                p for part in content_parts(content) if isinstance(part, dict) if (p := _text_part(part))
            ]
            calls = list(message.get("tool_calls") or [])
            if isinstance(message.get("function_call"), dict):
                calls.append({"function": message["function_call"]})
            for call in calls:
                function = call.get("function") or {}
                name = str(function.get("name") or "")
                if call.get("id"):
                    names[str(call["id"])] = name
                part: dict[str, Any] = {
                    "functionCall": {"name": name, "args": parse_tool_arguments(function.get("arguments"))}
                }
                signature = ((call.get("extra_content") or {}).get("google") or {}).get("thought_signature")
                if signature:
                    part["thoughtSignature"] = signature
                parts.append(part)
            _append(contents, "model", parts)
        elif role == "tool":
            call_id = str(message.get("tool_call_id") or "")
            name = names.get(call_id) or message.get("name")
            if not name:
                raise TranslationError(
                    f"{param}.tool_call_id",
                    f"No earlier assistant tool call has id {call_id!r}; Gemini needs the function name.",
                    code="invalid_value",
                )
            _append(contents, "user", [_function_response(str(name), content)])
        elif role == "function":
            if not message.get("name"):
                raise TranslationError(
                    f"{param}.name", "function messages need a name.", code="invalid_value"
                )
            _append(contents, "user", [_function_response(str(message["name"]), content)])
        else:
            raise TranslationError(
                f"{param}.role", f"Unsupported message role {role!r}.", code="invalid_value"
            )
    return system, contents


def _declarations(req: dict[str, Any]) -> list[dict[str, Any]]:
    declarations = []
    for function in function_tools(req):
        declaration: dict[str, Any] = {"name": function["name"]}
        if function.get("description"):
            declaration["description"] = function["description"]
        parameters = clean_schema(function.get("parameters") or {})
        # Gemini rejects an OBJECT with no properties: a tool without arguments has no parameters.
        if parameters.get("properties") or str(parameters.get("type", "object")).lower() != "object":
            declaration["parameters"] = parameters
        declarations.append(declaration)
    return declarations


def _tool_config(req: dict[str, Any]) -> dict[str, Any] | None:
    param = "tool_choice" if req.get("tool_choice") is not None else "function_call"
    choice = req.get(param)
    if choice is None:
        return None
    if choice == "auto":
        config: dict[str, Any] = {"mode": "AUTO"}
    elif choice in ("required", "any"):
        config = {"mode": "ANY"}
    elif choice == "none":
        config = {"mode": "NONE"}
    else:
        function = (
            choice.get("function")
            if isinstance(choice, dict) and choice.get("type") == "function"
            else choice
        )
        if not (isinstance(function, dict) and function.get("name")):
            raise TranslationError(param, f"Unsupported {param} {choice!r}.", code="invalid_value")
        config = {"mode": "ANY", "allowedFunctionNames": [function["name"]]}
    return {"functionCallingConfig": config}


def _generation_config(req: dict[str, Any]) -> dict[str, Any]:
    config: dict[str, Any] = {}
    if stops := stop_sequences(req.get("stop")):
        config["stopSequences"] = stops
    if req.get("n") not in (None, 1):
        config["candidateCount"] = req["n"]
    if (limit := max_output_tokens(req)) is not None:
        config["maxOutputTokens"] = limit
    for src, dst in (("temperature", "temperature"), ("top_p", "topP"), ("seed", "seed")):
        if req.get(src) is not None:
            config[dst] = req[src]
    for src, dst in (("presence_penalty", "presencePenalty"), ("frequency_penalty", "frequencyPenalty")):
        if req.get(src):  # a zero penalty is the default; some Gemini models reject the field outright
            config[dst] = req[src]
    response_format = req.get("response_format")
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind in ("json_object", "json_schema"):
        config["responseMimeType"] = "application/json"
    if kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        if isinstance(schema, dict) and schema:
            config["responseSchema"] = clean_schema(schema)
    return config


def to_gemini_request(openai_req: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI ``chat.completions.create`` body as a Gemini ``GenerateContentRequest`` (camelCase).

    The model is not part of the body: it goes in the URL. Raises :class:`TranslationError` for
    logprobs (not translated) and for content Gemini cannot take.
    """
    req = openai_req
    if req.get("logprobs"):
        raise TranslationError("logprobs", "logprobs are not supported for Gemini models.")
    if req.get("top_logprobs"):
        raise TranslationError("top_logprobs", "logprobs are not supported for Gemini models.")
    if "audio" in (req.get("modalities") or []):
        raise TranslationError(
            "modalities", "Audio output is not supported for Gemini models.", code="unsupported_value"
        )
    system, contents = _convert_messages(req)
    if not contents and system:
        # Gemini needs contents; a system-only prompt ("count to 10") becomes the user turn.
        contents, system = [{"role": "user", "parts": [{"text": "\n\n".join(system)}]}], []
    out: dict[str, Any] = {"contents": contents}
    if system:
        out["systemInstruction"] = {"parts": [{"text": "\n\n".join(system)}]}
    if declarations := _declarations(req):
        out["tools"] = [{"functionDeclarations": declarations}]
        if (config := _tool_config(req)) is not None:
            out["toolConfig"] = config
    if generation := _generation_config(req):
        out["generationConfig"] = generation
    return out


# --- response: Gemini → OpenAI -----------------------------------------------------------------


def _gemini_usage(meta: dict[str, Any]) -> dict[str, Any]:
    prompt = int(meta.get("promptTokenCount") or 0) + int(meta.get("toolUsePromptTokenCount") or 0)
    thoughts = int(meta.get("thoughtsTokenCount") or 0)
    completion = int(meta.get("candidatesTokenCount") or 0) + thoughts
    return openai_usage(
        prompt,
        completion,
        cached=int(meta.get("cachedContentTokenCount") or 0),
        reasoning=thoughts if thoughts else None,
    )


def _finish_reason(reason: str | None, has_tool_calls: bool) -> str:
    mapped = FINISH_REASONS.get(reason or "STOP", "stop")
    return "tool_calls" if has_tool_calls and mapped == "stop" else mapped


def _tool_call(part: dict[str, Any], number: int) -> dict[str, Any]:
    call = part["functionCall"]
    tool_call: dict[str, Any] = {
        "id": str(call.get("id") or f"call_{number}"),
        "type": "function",
        "function": {
            "name": call.get("name", ""),
            "arguments": orjson.dumps(call.get("args") or {}).decode(),
        },
    }
    if part.get("thoughtSignature"):
        tool_call["extra_content"] = {"google": {"thought_signature": part["thoughtSignature"]}}
    return tool_call


def _visible(parts: list[Any]) -> list[dict[str, Any]]:
    """Parts the client sees: thought summaries are dropped."""
    return [p for p in parts if isinstance(p, dict) and not p.get("thought")]


def from_gemini_response(
    resp: dict[str, Any], *, model: str, created: int, completion_id: str | None = None
) -> dict[str, Any]:
    """A Gemini ``GenerateContentResponse`` as an OpenAI ``chat.completion`` named after ``model``.

    The id is ``completion_id``, else ``chatcmpl-<responseId>``. An error body raises
    :class:`UpstreamStreamError`; a prompt blocked before any candidate gives one
    ``content_filter`` choice.
    """
    if not isinstance(resp, dict) or "error" in resp:
        raise gemini_error(resp)
    choices: list[dict[str, Any]] = []
    number = 0
    for position, candidate in enumerate(resp.get("candidates") or []):
        parts = _visible((candidate.get("content") or {}).get("parts") or [])
        texts = [str(p["text"]) for p in parts if "text" in p]
        tool_calls = []
        for part in parts:
            if isinstance(part.get("functionCall"), dict):
                tool_calls.append(_tool_call(part, number))
                number += 1
        message: dict[str, Any] = {
            "role": "assistant",
            "content": "".join(texts) if texts or not tool_calls else None,
            "refusal": None,
        }
        if tool_calls:
            message["tool_calls"] = tool_calls
        choices.append(
            {
                "index": int(candidate.get("index", position)),
                "message": message,
                "logprobs": None,
                "finish_reason": _finish_reason(candidate.get("finishReason"), bool(tool_calls)),
            }
        )
    if not choices:
        blocked = (resp.get("promptFeedback") or {}).get("blockReason")
        choices.append(
            {
                "index": 0,
                "message": {"role": "assistant", "content": None, "refusal": None},
                "logprobs": None,
                "finish_reason": "content_filter" if blocked else "stop",
            }
        )
    return {
        "id": completion_id
        or (f"chatcmpl-{resp['responseId']}" if resp.get("responseId") else "chatcmpl-gemini"),
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": sorted(choices, key=lambda c: c["index"]),
        "usage": _gemini_usage(resp.get("usageMetadata") or {}),
    }


# --- streaming: Gemini chunks → OpenAI chunks --------------------------------------------------


class GeminiStreamTranslator:
    """Gemini ``streamGenerateContent?alt=sse`` data objects in, OpenAI chunks out.

    Each ``data:`` object is a partial ``GenerateContentResponse``: text parts are deltas,
    ``functionCall`` parts arrive whole (one chunk with id, name and the full arguments), the last
    chunk of a candidate carries ``finishReason``; ``usageMetadata`` is cumulative, so the last one
    wins. An ``{"error": ...}`` object raises :class:`UpstreamStreamError`.
    """

    def __init__(self, model: str, created: int, completion_id: str | None = None) -> None:
        self.model = model
        self.created = created
        self.id = completion_id
        self.finish_reasons: dict[int, str] = {}
        self._started: set[int] = set()
        self._tool_counts: dict[int, int] = {}
        self._calls = 0
        self._usage: dict[str, Any] = {}
        self._seen = False

    @property
    def finished(self) -> bool:
        return self._seen and bool(self.finish_reasons) and self._started <= set(self.finish_reasons)

    @property
    def finish_reason(self) -> str | None:
        return self.finish_reasons.get(0)

    def _chunk(self, index: int, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return chunk(
            self.id or "chatcmpl-gemini",
            self.created,
            self.model,
            delta,
            index=index,
            finish_reason=finish_reason,
        )

    def _start(self, index: int) -> list[dict[str, Any]]:
        if index in self._started:
            return []
        self._started.add(index)
        return [self._chunk(index, {"role": "assistant", "content": ""})]

    def _finish(self, index: int, reason: str) -> list[dict[str, Any]]:
        if index in self.finish_reasons:
            return []
        self.finish_reasons[index] = reason
        return [*self._start(index), self._chunk(index, {}, reason)]

    def feed(self, data: dict[str, Any]) -> list[dict[str, Any]]:
        if not isinstance(data, dict) or "error" in data:
            raise gemini_error(data)
        self._seen = True
        if self.id is None:
            self.id = f"chatcmpl-{data['responseId']}" if data.get("responseId") else "chatcmpl-gemini"
        if isinstance(data.get("usageMetadata"), dict):
            self._usage = data["usageMetadata"]
        out: list[dict[str, Any]] = []
        candidates = data.get("candidates") or []
        for position, candidate in enumerate(candidates):
            index = int(candidate.get("index", position))
            out += self._start(index)
            for part in _visible((candidate.get("content") or {}).get("parts") or []):
                if part.get("text"):
                    out.append(self._chunk(index, {"content": str(part["text"])}))
                elif isinstance(part.get("functionCall"), dict):
                    call = {"index": self._tool_counts.get(index, 0), **_tool_call(part, self._calls)}
                    self._tool_counts[index] = call["index"] + 1
                    self._calls += 1
                    out.append(self._chunk(index, {"tool_calls": [call]}))
            if candidate.get("finishReason"):
                reason = _finish_reason(candidate["finishReason"], index in self._tool_counts)
                out += self._finish(index, reason)
        if not candidates and (data.get("promptFeedback") or {}).get("blockReason"):
            out += self._finish(0, "content_filter")
        return out

    def finish(self) -> list[dict[str, Any]]:
        """Call when the upstream stream ends: finishes any choice Gemini left open."""
        if not self._seen:
            raise UpstreamStreamError("gemini stream ended without any data")
        out: list[dict[str, Any]] = []
        for index in sorted(self._started or {0}):
            out += self._finish(index, _finish_reason("STOP", index in self._tool_counts))
        return out

    def usage(self) -> dict[str, Any]:
        return _gemini_usage(self._usage)

    def usage_chunk(self) -> dict[str, Any]:
        """The ``choices: []`` chunk OpenAI sends last when ``stream_options.include_usage`` is set."""
        return {
            "id": self.id or "chatcmpl-gemini",
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": self.usage(),
        }
