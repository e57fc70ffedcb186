"""The OpenAI chat-completions wire format, plus OpenPipe's extensions, as pydantic models, and
how a request becomes a call: its body parsed and its ``CallOptions`` (one precedence for the
HTTP ``op-*`` headers and the gRPC fields alike).

Requests are validated here and then forwarded as the client's own JSON (unknown fields
kept), so new OpenAI parameters pass through without a release. Responses are built as
plain dicts in the OpenAI shape: they come from upstreams already in that shape.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from services.common.errors import APIError, bad_request, invalid_input
from services.common.http import loads_json

if TYPE_CHECKING:
    from services.common.grpc.distillery.v1 import inference_pb2

Role = Literal["system", "developer", "user", "assistant", "tool", "function"]
CacheMode = Literal["readWrite", "readOnly", "writeOnly"]
DISABLED_CACHE = ("false", "none", "off", "")


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["text", "image_url", "input_audio", "file", "refusal"]
    text: str | None = None


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    arguments: str


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Role
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    function_call: FunctionCall | None = None

    @model_validator(mode="after")
    def _content_or_calls(self) -> ChatMessage:
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("tool messages need a tool_call_id")
        if self.content is None and not (self.tool_calls or self.function_call) and self.role != "assistant":
            raise ValueError(f"{self.role} messages need content")
        return self


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["function"]
    function: FunctionDefinition


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _schema_present(self) -> ResponseFormat:
        if self.type == "json_schema" and not self.json_schema:
            raise ValueError("json_schema is required when type is 'json_schema'")
        return self


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool | None = None


class Fallback(BaseModel):
    model: str = Field(min_length=1)
    timeout: float | None = Field(default=None, gt=0, description="milliseconds before falling back")


class OpenPipeOptions(BaseModel):
    """The body's ``openpipe`` field; the ``op-*`` headers say the same things."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    cache: str | bool | None = None
    fallback: Fallback | None = None
    tags: dict[str, str | int | float | bool | None] | None = None
    logRequest: bool | None = Field(default=None, alias="logRequest")
    log_request: bool | None = None
    criteria: list[str] | None = None


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    functions: list[FunctionDefinition] | None = None
    function_call: Literal["none", "auto"] | dict[str, Any] | None = None
    n: int | None = Field(default=None, ge=1, le=128)
    response_format: ResponseFormat | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    stop: str | list[str] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    seed: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    store: bool | None = None
    metadata: dict[str, str | int | float | bool | None] | None = None
    openpipe: OpenPipeOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stop_size(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        return value


DISTILLERY_FIELDS = ("openpipe", "store", "metadata")


def upstream_body(raw: dict[str, Any]) -> dict[str, Any]:
    """The client's request minus what only Distillery reads (logging and caching controls)."""
    return {k: v for k, v in raw.items() if k not in DISTILLERY_FIELDS}


def error_chunk(message: str, *, type: str = "server_error", code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": None, "code": code}}


# --- a request becomes a call ----------------------------------------------------------------------

CACHE_MODES = ("readWrite", "readOnly", "writeOnly")
MAX_CRITERIA = 10


@dataclass
class CallOptions:
    """How to treat one call, from the body's ``openpipe`` field and the ``op-*`` headers."""

    log_request: bool = False
    cache: str | None = None  # readWrite | readOnly | writeOnly
    tags: dict[str, Any] = field(default_factory=dict)
    fallback: Fallback | None = None
    criteria: tuple[str, ...] = ()  # op-criteria: best-of-N, see services/router/criteria.py

    @property
    def reads_cache(self) -> bool:
        return self.cache in ("readWrite", "readOnly")

    @property
    def writes_cache(self) -> bool:
        return self.cache in ("readWrite", "writeOnly")


def parse_chat_request(payload: bytes) -> tuple[dict[str, Any], ChatCompletionRequest]:
    """An HTTP body: the client's JSON as sent (forwarded as is) and its validated form."""
    raw = loads_json(payload)
    if not isinstance(raw, dict):
        raise bad_request("Request body must be a JSON object.")
    try:
        return raw, ChatCompletionRequest.model_validate(raw)
    except ValidationError as exc:
        raise invalid_input(exc.errors()) from None


def parse_rpc_request(request_json: str, *, stream: bool) -> tuple[dict[str, Any], ChatCompletionRequest]:
    """A gRPC ``request_json``: the raw OpenAI body and its validated form. The RPC decides
    whether to stream, not the body's ``stream`` field."""
    try:
        raw = loads_json(request_json.encode("utf-8", "surrogatepass"), subject="request_json")
    except APIError as exc:  # the same JSON policy as the HTTP routes; fields are named inside it
        param = "request_json" if exc.param == "body" else f"request_json.{exc.param}"
        raise bad_request(exc.message, param=param, code=exc.code) from None
    if not isinstance(raw, dict):
        raise bad_request("request_json must be a JSON object.", param="request_json")
    if stream:
        raw["stream"] = True
    else:
        raw.pop("stream", None)
        raw.pop("stream_options", None)
    try:
        body = ChatCompletionRequest.model_validate(raw)
    except ValidationError as exc:
        raise invalid_input(exc.errors(), what="request_json") from None
    return raw, body


def cache_mode(value: str | bool | None, source: str) -> str | None:
    if value is None or value is False or str(value).lower() in DISABLED_CACHE:
        return None
    if value not in CACHE_MODES:
        raise bad_request(f"{source} must be one of {', '.join(CACHE_MODES)}, got {value!r}.", param=source)
    return str(value)


def criteria_ids(header: str | None, body: list[str] | None) -> tuple[str, ...]:
    """The ``op-criteria`` header (a JSON list of ids) or else the body's ``openpipe.criteria``."""
    if header is None or not header.strip():
        ids: Any = body or []
    else:
        try:
            ids = orjson.loads(header)
        except orjson.JSONDecodeError:
            ids = None
    if not isinstance(ids, list) or not all(isinstance(i, str) and i.strip() for i in ids):
        raise bad_request(
            'op-criteria must be a JSON list of criterion ids, e.g. ["tone@v2", "accuracy"].',
            param="op-criteria",
        )
    if len(ids) > MAX_CRITERIA:
        raise bad_request(f"op-criteria names at most {MAX_CRITERIA} criteria.", param="op-criteria")
    return tuple(dict.fromkeys(i.strip() for i in ids))


def _header_tags(value: str | None) -> dict[str, Any]:
    if not value:
        return {}
    try:
        tags = orjson.loads(value)
    except orjson.JSONDecodeError:
        tags = None
    if not isinstance(tags, dict):
        raise bad_request("The op-tags header must be a JSON object.", param="op-tags")
    return tags


def call_options(
    body: ChatCompletionRequest,
    *,
    log_request: bool | None = None,
    cache: tuple[str | bool | None, str] | None = None,
    tags: Mapping[str, Any] | None = None,
    fallback: Fallback | None = None,
    criteria: tuple[str, ...] = (),
) -> CallOptions:
    """The transport's own controls (``op-*`` headers, gRPC fields; ``None``: not given) win over
    the body's ``openpipe`` field, which wins over ``store``. ``cache`` is (value, its name)."""
    options = body.openpipe or OpenPipeOptions()
    if log_request is None:
        if options.logRequest is not None or options.log_request is not None:
            log_request = bool(options.logRequest if options.logRequest is not None else options.log_request)
        else:
            log_request = bool(body.store)
    mode = cache_mode(*cache) if cache is not None else cache_mode(options.cache, "openpipe.cache")
    return CallOptions(
        log_request=log_request,
        cache=mode,
        tags={**(options.tags or {}), **(tags or {})},
        fallback=fallback or options.fallback,
        criteria=criteria,
    )


def http_call_options(headers: Mapping[str, str], body: ChatCompletionRequest) -> CallOptions:
    """Options from the ``op-*`` headers over the body (best-of-N ``op-criteria``: router/criteria.py)."""
    criteria = criteria_ids(headers.get("op-criteria"), (body.openpipe or OpenPipeOptions()).criteria)
    if criteria and body.stream:
        raise bad_request("op-criteria cannot be used with stream: true.", param="op-criteria")
    header = headers.get("op-log-request")
    header_cache = headers.get("op-cache")
    return call_options(
        body,
        log_request=None if header is None else header.strip().lower() == "true",
        cache=None if header_cache is None else (header_cache, "op-cache"),
        tags=_header_tags(headers.get("op-tags")),
        criteria=criteria,
    )


def rpc_call_options(request: inference_pb2.CompletionRequest, body: ChatCompletionRequest) -> CallOptions:
    """Options from the typed ``CompletionRequest`` fields over the body."""
    fallback = None
    if request.HasField("fallback"):
        if not request.fallback.model:
            raise bad_request("fallback.model must name the model to fall back to.", param="fallback.model")
        fallback = Fallback(model=request.fallback.model, timeout=request.fallback.timeout_ms or None)
    return call_options(
        body,
        log_request=request.log_request if request.HasField("log_request") else None,
        cache=(request.cache, "cache") if request.cache else None,
        tags=dict(request.tags),
        fallback=fallback,
    )
