"""The adapter-fetcher sidecar of a vLLM pod: ``POST /fetch {"adapter_key"}`` copies a LoRA adapter
from the blob store onto the pod's adapter volume (once) and answers ``{"path"}`` — the
``lora_path`` the platform then hands to vLLM's ``/v1/load_lora_adapter``. So vLLM pods need no
volume shared with the platform, and the blob-store credentials stay out of the vLLM container.

    python -m services.serving.adapter_fetcher --port 8001
    # reads DISTILLERY_BLOB_URL and DISTILLERY_VLLM_ADAPTER_DIR
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel, Field

from services.common.blobstore import BlobStore, blob_store_from_url
from services.common.errors import APIError, install_error_handlers
from services.common.settings import Settings
from services.serving.vllm import ServingError, fetch_adapter


class FetchRequest(BaseModel):
    adapter_key: str = Field(min_length=1, max_length=2048)


def create_app(blobs: BlobStore, adapter_dir: Path) -> FastAPI:
    app = FastAPI(title="Distillery adapter fetcher")
    install_error_handlers(app)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/fetch")
    async def fetch(body: FetchRequest) -> dict[str, str]:
        try:
            path = await fetch_adapter(blobs, adapter_dir, body.adapter_key)
        except ServingError as exc:
            raise APIError(404, str(exc), param="adapter_key", code="adapter_not_found") from None
        return {"path": str(path)}

    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m services.serving.adapter_fetcher")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    settings = Settings()
    app = create_app(blob_store_from_url(settings.resolved_blob_url()), settings.vllm_adapter_dir)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    asyncio.run(uvicorn.Server(config).serve())
