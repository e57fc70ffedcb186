"""The OpenAI chat-completions wire format, plus OpenPipe's extensions, as pydantic models.

Requests are validated here and then forwarded as the client's own JSON (unknown fields
kept), so new OpenAI parameters pass through without a release. Responses are built as
plain dicts in the OpenAI shape: they come from upstreams already in that shape.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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
