"""Router HTTP routes (thin): ``POST /chat/completions`` and the deprecated ``/check-cache``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from services.common.auth import require_project
from services.common.errors import bad_request, invalid_input
from services.common.http import loads_json, openapi_json_body
from services.router.cache import cache_key
from services.router.criteria import criteria_ids
from services.router.protocol import DISABLED_CACHE, ChatCompletionRequest, OpenPipeOptions
from services.router.service import CallOptions, ChatService

router = APIRouter(tags=["chat"])

CACHE_MODES = ("readWrite", "readOnly", "writeOnly")
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


class CheckCacheRequest(BaseModel):
    """``POST /check-cache`` (deprecated): the response cached for a request, if any."""

    reqPayload: dict[str, Any]


async def chat_service(request: Request) -> ChatService:
    return request.app.state.chat


async def _json_body(request: Request) -> Any:
    return loads_json(await request.body())


def cache_mode(value: str | bool | None, source: str) -> str | None:
    if value is None or value is False or str(value).lower() in DISABLED_CACHE:
        return None
    if value not in CACHE_MODES:
        raise bad_request(f"{source} must be one of {', '.join(CACHE_MODES)}, got {value!r}.", param=source)
    return str(value)


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


def call_options(headers: Mapping[str, str], body: ChatCompletionRequest) -> CallOptions:
    """The ``op-*`` headers win over the body's ``openpipe`` field, which wins over ``store``."""
    options = body.openpipe or OpenPipeOptions()
    criteria = criteria_ids(headers.get("op-criteria"), options.criteria)  # best-of-N: router/criteria.py
    if criteria and body.stream:
        raise bad_request("op-criteria cannot be used with stream: true.", param="op-criteria")
    header = headers.get("op-log-request")
    if header is not None:
        log_request = header.strip().lower() == "true"
    elif options.logRequest is not None or options.log_request is not None:
        log_request = bool(options.logRequest if options.logRequest is not None else options.log_request)
    else:
        log_request = bool(body.store)
    header_cache = headers.get("op-cache")
    cache = (
        cache_mode(header_cache, "op-cache")
        if header_cache is not None
        else cache_mode(options.cache, "openpipe.cache")
    )
    tags = {**(options.tags or {}), **_header_tags(headers.get("op-tags"))}
    return CallOptions(
        log_request=log_request, cache=cache, tags=tags, fallback=options.fallback, criteria=criteria
    )


def parse_chat_request(payload: bytes) -> tuple[dict, ChatCompletionRequest]:
    """The client's JSON as sent (forwarded as is) and its validated form."""
    raw = loads_json(payload)
    if not isinstance(raw, dict):
        raise bad_request("Request body must be a JSON object.")
    try:
        return raw, ChatCompletionRequest.model_validate(raw)
    except ValidationError as exc:
        raise invalid_input(exc.errors()) from None


CHAT_RESPONSES: dict[int | str, dict] = {
    200: {
        "description": "A chat completion, or with `stream: true` its chunks as server-sent events",
        "content": {
            "application/json": {"schema": {"type": "object"}},
            "text/event-stream": {"schema": {"type": "string"}},
        },
    }
}


@router.post(
    "/chat/completions",
    response_class=Response,
    responses=CHAT_RESPONSES,
    openapi_extra=openapi_json_body(
        ChatCompletionRequest, description="The OpenAI chat-completions request plus `openpipe`, `store`"
    ),
)
async def chat_completions(
    request: Request, project_id: str = Depends(require_project), chat: ChatService = Depends(chat_service)
) -> Response:
    """Also served framework-free by ``fastpath.ChatCompletionsEndpoint``; this route documents it and
    serves apps mounted without the platform's fast routes."""
    raw, body = parse_chat_request(await request.body())
    options = call_options(request.headers, body)
    if body.stream:
        chunks = await chat.open_stream(project_id=project_id, raw=raw, options=options)
        return StreamingResponse(chunks, media_type="text/event-stream", headers=SSE_HEADERS)
    completion = await chat.complete(project_id=project_id, raw=raw, options=options)
    return Response(orjson.dumps(completion), media_type="application/json")


@router.post("/check-cache", deprecated=True, openapi_extra=openapi_json_body(CheckCacheRequest))
async def check_cache(
    request: Request, project_id: str = Depends(require_project), chat: ChatService = Depends(chat_service)
) -> dict:
    body = await _json_body(request)
    payload = body.get("reqPayload") if isinstance(body, dict) else None
    if not isinstance(payload, dict):
        raise bad_request("reqPayload must be a chat completion request object.", param="reqPayload")
    return {"respPayload": await chat.cache.get(cache_key(project_id, payload))}
