"""Router HTTP routes (thin): ``POST /chat/completions`` and the deprecated ``/check-cache``."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel

from services.common.auth import require_project
from services.common.errors import bad_request
from services.common.http import loads_json, openapi_json_body
from services.router.cache import cache_key
from services.router.fastpath import SSE_HEADERS
from services.router.protocol import ChatCompletionRequest, http_call_options, parse_chat_request
from services.router.service import ChatService, as_sse

router = APIRouter(tags=["chat"])


class CheckCacheRequest(BaseModel):
    """``POST /check-cache`` (deprecated): the response cached for a request, if any."""

    reqPayload: dict[str, Any]


async def chat_service(request: Request) -> ChatService:
    return request.app.state.router_deps.chat  # the RouterDeps the fast path and gRPC read too


async def _json_body(request: Request) -> Any:
    return loads_json(await request.body())


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
    """Also served framework-free by ``fastpath.ChatCompletionsEndpoint`` (the same three calls);
    this route documents it and serves apps mounted without the platform's fast routes."""
    raw, body = parse_chat_request(await request.body())
    options = http_call_options(request.headers, body)
    result = await chat.respond(project_id=project_id, raw=raw, options=options, stream=bool(body.stream))
    if isinstance(result, dict):
        return Response(orjson.dumps(result), media_type="application/json")
    return StreamingResponse(as_sse(result), media_type="text/event-stream", headers=SSE_HEADERS)


@router.post("/check-cache", deprecated=True, openapi_extra=openapi_json_body(CheckCacheRequest))
async def check_cache(
    request: Request, project_id: str = Depends(require_project), chat: ChatService = Depends(chat_service)
) -> dict:
    body = await _json_body(request)
    payload = body.get("reqPayload") if isinstance(body, dict) else None
    if not isinstance(payload, dict):
        raise bad_request("reqPayload must be a chat completion request object.", param="reqPayload")
    return {"respPayload": await chat.cache.get(cache_key(project_id, payload))}
