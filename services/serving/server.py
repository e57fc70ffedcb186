"""The local model server's HTTP app — OpenAI ``/v1/chat/completions`` (JSON and SSE),
``/v1/models``, vLLM's runtime LoRA routes ``/v1/load_lora_adapter`` / ``/v1/unload_lora_adapter``
— and its wiring from settings (used by ``__main__`` and by tests)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response, StreamingResponse

from services.common.blobstore import blob_store_from_url
from services.common.errors import install_error_handlers
from services.common.settings import Settings
from services.serving.completions import complete, parse_body, prepare, stream
from services.serving.protocol import LoadAdapter, UnloadAdapter
from services.serving.registry import ModelRegistry

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def create_app(registry: ModelRegistry, *, preload: tuple[str, ...] = ()) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for base in preload:
            await registry.engine(base)
        try:
            yield
        finally:
            await asyncio.to_thread(registry.stop)

    app = FastAPI(title="Distillery model server", lifespan=lifespan)
    install_error_handlers(app)
    app.state.registry = registry

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "bases": sorted(registry.engines), "adapters": len(registry.adapters)}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": registry.listing()}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await parse_body(request)
        prepared = await prepare(registry, body)
        if body.stream:
            return StreamingResponse(stream(prepared), media_type="text/event-stream", headers=SSE_HEADERS)
        return Response(orjson.dumps(await complete(prepared)), media_type="application/json")

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadAdapter) -> PlainTextResponse:
        await registry.load_adapter(body.lora_name, body.lora_path, body.base_model)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadAdapter) -> PlainTextResponse:
        registry.unload_adapter(body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    return app


def model_store_dir(settings: Settings) -> Path:
    resolved = getattr(settings, "resolved_model_store_dir", None)
    return resolved() if resolved else (settings.data_dir / "models").resolve()


def build_registry(settings: Settings) -> ModelRegistry:
    import torch

    device = settings.model_server_device or ("cuda" if torch.cuda.is_available() else "cpu")
    return ModelRegistry(
        blobs=blob_store_from_url(settings.resolved_blob_url()),
        store_dir=model_store_dir(settings),
        cache_dir=(settings.data_dir / "serving" / "adapters").resolve(),
        max_batch=settings.model_server_max_batch,
        max_adapters=settings.model_server_max_adapters,
        device=device,
    )


def build_app(
    settings: Settings | None = None, *, preload: list[str] | None = None
) -> tuple[FastAPI, Settings]:
    settings = settings or Settings()
    bases = preload if preload is not None else [b for b in settings.model_server_preload.split(",") if b]
    return create_app(build_registry(settings), preload=tuple(bases)), settings


def serve(app: FastAPI, *, host: str, port: int) -> None:
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="on")
    asyncio.run(uvicorn.Server(config).serve())
