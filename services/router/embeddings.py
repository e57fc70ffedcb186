"""``POST /embeddings``: OpenAI-compatible embeddings through the router, logged and cached like chat.

Routing is the chat router's (bare OpenAI names, ``openai:<m>``, ``openpipe:<provider>/<model>``
for external OpenAI- or Azure-compatible providers); only OpenAI-compatible upstreams serve
embeddings. The response cache key covers model, input, dimensions and encoding format; the
``op-cache`` header / ``openpipe.cache`` body field choose the mode, ``store: true`` (or
``op-log-request: true``) logs the call. gRPC ``Embeddings.Embed`` gives other services the same.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

import grpc
import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.common.auth import KeyRing, require_project, resolve_grpc_project
from services.common.errors import APIError, bad_request, invalid_input
from services.common.events import LogEvent
from services.common.grpc.distillery.v1 import embeddings_pb2, embeddings_pb2_grpc
from services.common.http import openapi_json_body
from services.common.log_fields import merge_metadata, new_log_id
from services.common.rpc import error_metadata, status_code
from services.router.protocol import cache_mode
from services.router.routing import Route
from services.router.service import ChatService
from services.router.upstream import UpstreamError

log = logging.getLogger(__name__)

router = APIRouter(tags=["embeddings"])

CACHE_FIELDS = ("model", "input", "dimensions", "encoding_format")
UPSTREAM_FIELDS = ("input", "dimensions", "encoding_format", "user")


class EmbeddingRequest(BaseModel):
    """The OpenAI embeddings request (plus ``store``, ``metadata`` and ``openpipe`` like chat)."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    input: str | list[str] | list[int] | list[list[int]]
    dimensions: int | None = Field(None, ge=1)
    encoding_format: str | None = Field(None, pattern="^(float|base64)$")
    user: str | None = None
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    openpipe: dict[str, Any] | None = None


def embeddings_cache_key(project_id: str, raw: dict[str, Any]) -> str:
    canonical = orjson.dumps({f: raw.get(f) for f in CACHE_FIELDS}, option=orjson.OPT_SORT_KEYS)
    return f"distillery:embeddings:{project_id}:{hashlib.sha256(canonical).hexdigest()}"


def _target(route: Route) -> tuple[str, dict[str, str], dict[str, Any]]:
    if route.provider == "azure":
        path = f"/openai/deployments/{route.upstream_model}/embeddings?api-version={route.api_version}"
        return path, {"api-key": route.api_key or ""}, {}
    headers = {"authorization": f"Bearer {route.api_key}"} if route.api_key else {}
    return "/embeddings", headers, {"model": route.upstream_model}


class EmbeddingsService:
    """Embeddings over the chat service's routing, upstream pool, cache, limits and log shipper."""

    def __init__(self, chat: ChatService) -> None:
        self.chat = chat

    async def embed(
        self, *, project_id: str, raw: dict[str, Any], cache: str | None, log_request: bool
    ) -> dict[str, Any]:
        requested_at = int(time.time() * 1000)
        answer: dict[str, Any] | None = None
        error: APIError | None = None
        hit = False
        try:
            async with self.chat.limiter.slot(project_id):
                key = embeddings_cache_key(project_id, raw)
                if cache in ("readWrite", "readOnly") and (cached := await self.chat._cache_get(key)):
                    answer, hit = cached, True
                    return cached
                answer = await self._call(project_id, raw)
                if cache in ("readWrite", "writeOnly"):
                    await self.chat._cache_set(key, answer)
                return answer
        except APIError as exc:
            error = exc
            raise
        finally:
            if log_request and self.chat.shipper is not None:
                self._log(project_id, raw, requested_at, answer, error, hit)

    async def _call(self, project_id: str, raw: dict[str, Any]) -> dict[str, Any]:
        route = await self.chat.resolve(project_id, raw["model"])  # catches up with catalog.v1 on a miss
        if route.provider not in ("openai", "azure"):
            raise bad_request(
                f"{route.provider} models do not serve embeddings here; use an OpenAI-compatible model.",
                param="model",
                code="embeddings_unsupported",
            )
        path, headers, overrides = _target(route)
        body = {k: raw[k] for k in UPSTREAM_FIELDS if raw.get(k) is not None}
        result = await self.chat.upstream.post_json(
            "openai", route.base_url, path, {**body, **overrides}, headers=headers
        )
        if not isinstance(result, dict) or not isinstance(result.get("data"), list):
            raise UpstreamError(502, "the provider returned an embeddings answer without data")
        result["model"] = raw["model"]
        return result

    def _log(
        self,
        project_id: str,
        raw: dict[str, Any],
        requested_at: int,
        answer: dict[str, Any] | None,
        error: APIError | None,
        hit: bool,
    ) -> None:
        response: Any = answer
        if error is not None:
            response = {"error": {"message": error.message, "type": error.type, "code": error.code}}
        self.chat.shipper.ship(  # type: ignore[union-attr]
            LogEvent(
                log_id=new_log_id(),
                project_id=project_id,
                requested_at=requested_at,
                received_at=int(time.time() * 1000),
                req_payload={k: v for k, v in raw.items() if k != "openpipe"},
                resp_payload=response,
                status_code=error.status_code if error else 200,
                error_message=error.message if error else None,
                cache_hit=hit,
                metadata=merge_metadata(
                    raw.get("metadata"), (raw.get("openpipe") or {}).get("tags") or {}, {}
                ),
            )
        )


def parse_embedding_request(payload: bytes | str, what: str = "body") -> dict[str, Any]:
    try:
        raw = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"Request {what} is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(raw, dict):
        raise bad_request(f"Request {what} must be a JSON object.")
    try:
        EmbeddingRequest.model_validate(raw)
    except ValidationError as exc:
        raise invalid_input(exc.errors()) from None
    if raw["input"] == [] or raw["input"] == "":
        raise bad_request("input must not be empty.", param="input")
    return raw


def _options(raw: dict[str, Any], headers: Any) -> tuple[str | None, bool]:
    openpipe = raw.get("openpipe") or {}
    header_cache = headers.get("op-cache")
    cache = (
        cache_mode(header_cache, "op-cache")
        if header_cache is not None
        else cache_mode(openpipe.get("cache"), "openpipe.cache")
    )
    header_log = headers.get("op-log-request")
    if header_log is not None:
        return cache, header_log.strip().lower() == "true"
    log_flag = openpipe.get("logRequest", openpipe.get("log_request"))
    return cache, bool(log_flag if log_flag is not None else raw.get("store"))


@router.post("/embeddings", openapi_extra=openapi_json_body(EmbeddingRequest))
async def create_embeddings(request: Request, project_id: str = Depends(require_project)) -> Response:
    raw = parse_embedding_request(await request.body())
    cache, log_request = _options(raw, request.headers)
    service: EmbeddingsService = request.app.state.embeddings
    answer = await service.embed(project_id=project_id, raw=raw, cache=cache, log_request=log_request)
    return Response(orjson.dumps(answer), media_type="application/json")


class EmbeddingsServicer(embeddings_pb2_grpc.EmbeddingsServicer):
    def __init__(self, service: EmbeddingsService, keyring: KeyRing, internal_token: str | None) -> None:
        self.service = service
        self.keyring = keyring
        self.internal_token = internal_token

    async def Embed(
        self, request: embeddings_pb2.EmbeddingRequest, context: grpc.aio.ServicerContext
    ) -> embeddings_pb2.EmbeddingResponse:
        try:
            project_id = resolve_grpc_project(
                self.keyring, context.invocation_metadata(), self.internal_token
            )
            raw = parse_embedding_request(request.request_json, "request_json")
            cache = cache_mode(request.cache, "cache") if request.cache else None
            log_request = request.log_request if request.HasField("log_request") else False
            answer = await self.service.embed(
                project_id=project_id, raw=raw, cache=cache, log_request=log_request
            )
        except APIError as exc:
            await context.abort(
                status_code(exc.status_code), exc.message, trailing_metadata=error_metadata(exc)
            )
            raise AssertionError("unreachable") from None
        except Exception:
            log.exception("Embeddings.Embed failed")
            await context.abort(grpc.StatusCode.INTERNAL, "The embeddings router failed unexpectedly.")
            raise AssertionError("unreachable") from None
        return embeddings_pb2.EmbeddingResponse(response_json=orjson.dumps(answer).decode())


def setup_embeddings(platform: Any, chat: ChatService, internal_token: str | None) -> None:
    """Wire the route, the service and the gRPC servicer (called from ``services.router.app``)."""
    service = EmbeddingsService(chat)
    platform.state["embeddings"] = service
    platform.routers.append(router)
    platform.grpc_servicers.append(
        lambda server: embeddings_pb2_grpc.add_EmbeddingsServicer_to_server(
            EmbeddingsServicer(service, platform.keyring, internal_token), server
        )
    )
