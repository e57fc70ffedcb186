"""Wiring of the local model server from settings (used by ``__main__`` and by tests)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from services.common.blobstore import blob_store_from_url
from services.common.settings import Settings
from services.serving.app import create_app
from services.serving.registry import ModelRegistry


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
