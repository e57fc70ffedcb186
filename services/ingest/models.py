"""The ingest wire format: request and response bodies exactly as clients send and parse them."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from services.common.events import MAX_STATUS_CODE, MAX_UNIX_MS
from services.common.log_fields import LogStatus

TAG_NAME = re.compile(r"^[A-Za-z0-9_$.]+$")
TagValue = str | int | float | bool | None


def _check_tag_names(values: dict[str, Any] | None) -> dict[str, Any] | None:
    for name in values or {}:
        if not TAG_NAME.match(name):
            raise ValueError(f"invalid tag name {name!r}: use only letters, digits, '_', '$' and '.'")
    return values


class ReportRequest(BaseModel):
    """``POST /report``: a call the client made to OpenAI (or anything OpenAI-shaped)."""

    model_config = ConfigDict(extra="ignore")

    requestedAt: float | None = Field(None, ge=0, le=MAX_UNIX_MS, description="unix ms")
    receivedAt: float | None = Field(None, ge=0, le=MAX_UNIX_MS, description="unix ms")
    reqPayload: Any = None
    respPayload: Any = None
    statusCode: float | None = Field(None, ge=0, le=MAX_STATUS_CODE)
    errorMessage: str | None = None
    tags: dict[str, TagValue] | None = None

    _names = field_validator("tags")(_check_tag_names)


class AnthropicReportRequest(ReportRequest):
    """``POST /report-anthropic``: payloads are Anthropic Messages API shapes."""

    metadata: dict[str, TagValue] | None = None

    _metadata_names = field_validator("metadata")(_check_tag_names)


class ReportResponse(BaseModel):
    status: Literal["ok"] = "ok"


class LogFilter(BaseModel):
    model_config = ConfigDict(extra="forbid")

    field: str = Field(description='"model", "completionId", "metadata.<key>" or "tags.<key>"')
    equals: str | int | float | bool


class UpdateMetadataRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    filters: list[LogFilter]
    metadata: dict[str, str | int | float | bool | None]

    _names = field_validator("metadata")(_check_tag_names)


class UpdateTagsRequest(BaseModel):
    """Deprecated alias of update-metadata."""

    model_config = ConfigDict(extra="forbid")

    filters: list[LogFilter]
    tags: dict[str, str | int | float | bool | None]

    _names = field_validator("tags")(_check_tag_names)


class UpdateMetadataResponse(BaseModel):
    matchedLogs: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class RequestLog(BaseModel):
    """One captured call as ``GET /logs`` returns it."""

    object: Literal["request_log"] = "request_log"
    id: str
    requestedAt: int
    receivedAt: int
    latencyMs: int
    model: str
    provider: str
    completionId: str
    status: LogStatus
    statusCode: int | None
    errorMessage: str | None
    finishReason: str
    usage: Usage
    cost: float | None
    cacheHit: bool
    metadata: dict[str, str]
    reqPayload: Any
    respPayload: Any


class RequestLogList(BaseModel):
    object: Literal["list"] = "list"
    data: list[RequestLog]
    has_more: bool
    next_cursor: str | None


class LogCount(BaseModel):
    object: Literal["request_log.count"] = "request_log.count"
    count: int
