"""Which engine serves a model name: base models loaded once each, adapters fetched from the blob
store into a disk cache and registered on their base's engine (which keeps the most recently used
ones in memory).

A request's ``model`` is a base name (``distillery/tiny-chat``), a registered adapter name (see
``POST /v1/load_lora_adapter``), or — like vLLM's LoRA resolver — an adapter's blob-store key,
fetched and registered on first use, so a restarted server still answers every deployed model.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from services.common.blobstore import BlobNotFound, BlobStore, BlobStoreError, FileBlobStore
from services.common.errors import APIError
from services.common.model_store import (
    ModelNotFound,
    ensure_base_model,
    local_model_dir,
    validate_model_name,
)
from services.common.precision import prefer_bf16
from services.serving.engine import Engine

log = logging.getLogger(__name__)


def serving_dtype(folder: Path, device: str) -> Any:
    """bf16 on a GPU, and on a CPU with native bf16 for models large enough to gain (SmolLM2-135M:
    ~2x faster prefill and decoding than fp32); fp32 otherwise."""
    import torch
    from transformers import AutoConfig

    hidden = int(getattr(AutoConfig.from_pretrained(folder), "hidden_size", 0) or 0)
    return torch.bfloat16 if prefer_bf16(hidden, on_gpu=device.startswith("cuda")) else torch.float32


ADAPTER_CONFIG = "adapter_config.json"
_COMPLETE = ".complete"


def model_not_found(model: str, why: str) -> APIError:
    return APIError(
        404,
        f"The model {model!r} does not exist on this server: {why}",
        param="model",
        code="model_not_found",
    )


@dataclass(frozen=True)
class Adapter:
    name: str  # what requests call it
    source: str  # blob key prefix, or a local folder
    base: str
    path: Path  # the local copy
    internal: str  # the engine's (peft's) name for it: safe characters only


def adapter_key(source: str, blobs: BlobStore | None) -> str:
    """A blob key prefix from ``source``: a plain key, ``s3://bucket/key`` or a ``file://`` URI."""
    parts = urlsplit(source)
    if parts.scheme in ("s3", "s3+https"):
        return parts.path.strip("/")
    if parts.scheme == "file" and isinstance(blobs, FileBlobStore):
        path = Path(unquote(parts.path))
        try:
            return path.relative_to(blobs.root).as_posix()
        except ValueError:
            return path.as_posix()
    return source.strip("/")


def base_from_config(path: Path) -> str | None:
    """The base named in ``adapter_config.json``: a model-store name, or its cache folder's name."""
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    name = config.get("base_model_name_or_path")
    if not isinstance(name, str) or not name:
        return None
    if name.startswith("/"):  # a local store folder: <store>/<org>--<model>
        return Path(name).name.replace("--", "/")
    return name


class ModelRegistry:
    def __init__(
        self,
        *,
        blobs: BlobStore | None,
        store_dir: Path,
        cache_dir: Path,
        max_batch: int = 16,
        max_adapters: int = 8,
        default_base: str | None = None,
        device: str = "cpu",
    ) -> None:
        self.blobs = blobs
        self.store_dir = Path(store_dir)
        self.cache_dir = Path(cache_dir)
        self.max_batch = max_batch
        self.max_adapters = max_adapters
        self.default_base = default_base
        self.device = device
        self.engines: dict[str, Engine] = {}
        self.adapters: dict[str, Adapter] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    # --- bases ---------------------------------------------------------------------------------

    async def engine(self, base: str) -> Engine:
        if (engine := self.engines.get(base)) is not None:
            return engine
        async with self._lock(f"base:{base}"):
            if base not in self.engines:
                self.engines[base] = await asyncio.to_thread(self._load_base, base)
        return self.engines[base]

    def _load_base(self, base: str) -> Engine:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            folder = ensure_base_model(base, store_dir=self.store_dir, blobs=self.blobs)
        except (ModelNotFound, ValueError) as exc:
            raise model_not_found(base, str(exc)) from None
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=serving_dtype(folder, self.device))
        model = model.to(self.device)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        log.info("base model %s loaded from %s on %s", base, folder, self.device)
        return Engine(
            model, tokenizer, max_batch=self.max_batch, max_adapters=self.max_adapters, device=self.device
        )

    def is_base(self, name: str) -> bool:
        if name in self.engines:
            return True
        try:
            return (local_model_dir(name, self.store_dir) / _COMPLETE).exists() or name in _builtin()
        except ValueError:
            return False

    # --- adapters ------------------------------------------------------------------------------

    async def load_adapter(self, name: str, source: str, base: str | None = None) -> Adapter:
        """Fetch the adapter (once; then from the disk cache) and make ``name`` serve it."""
        async with self._lock(f"adapter:{name}"):
            known = self.adapters.get(name)
            if known is not None and known.source == source and (base is None or base == known.base):
                return known  # concurrent first requests for one adapter load it once
            path = await self._local_copy(name, source)
            base = base or base_from_config(path) or self.default_base
            if not base:
                raise APIError(
                    400, f"Adapter {name!r} names no base model; pass base_model.", param="base_model"
                )
            engine = await self.engine(base)
            internal = "a" + hashlib.sha256(name.encode()).hexdigest()[:16]
            engine.register_adapter(internal, path)
            adapter = Adapter(name=name, source=source, base=base, path=path, internal=internal)
            self.adapters[name] = adapter
            log.info("adapter %s (base %s) registered from %s", name, base, source)
            return adapter

    def unload_adapter(self, name: str) -> None:
        adapter = self.adapters.pop(name, None)
        if adapter is None:
            raise APIError(
                404, f"The LoRA adapter {name!r} cannot be found.", param="lora_name", code="not_found"
            )
        engine = self.engines.get(adapter.base)
        if engine is not None:
            engine.forget_adapter(adapter.internal)

    async def _local_copy(self, name: str, source: str) -> Path:
        local = Path(source)
        if local.is_absolute() and (local / ADAPTER_CONFIG).is_file():
            return local
        if self.blobs is None:
            raise model_not_found(name, "no blob store is configured to fetch its adapter from")
        key = adapter_key(source, self.blobs)
        target = self.cache_dir / hashlib.sha256(key.encode()).hexdigest()[:24]
        if (target / _COMPLETE).exists():
            return target
        try:
            keys = await self.blobs.list(key.rstrip("/") + "/")
        except (BlobStoreError, ValueError) as exc:
            raise model_not_found(name, f"its adapter cannot be listed in the blob store ({exc})") from None
        if not any(k.endswith("/" + ADAPTER_CONFIG) for k in keys):
            raise model_not_found(name, f"no adapter (adapter_config.json) under {key!r} in the blob store")
        scratch = target.with_name(target.name + ".partial")
        shutil.rmtree(scratch, ignore_errors=True)
        try:
            for blob in keys:
                await self.blobs.download_file(blob, scratch / blob[len(key.rstrip("/")) + 1 :])
        except (BlobNotFound, BlobStoreError) as exc:
            shutil.rmtree(scratch, ignore_errors=True)
            raise model_not_found(
                name, f"its adapter could not be fetched from the blob store ({exc})"
            ) from None
        (scratch / _COMPLETE).write_text(key)
        shutil.rmtree(target, ignore_errors=True)
        scratch.rename(target)
        return target

    # --- resolution ----------------------------------------------------------------------------

    async def resolve(self, model: str) -> tuple[Engine, Adapter | None]:
        adapter = self.adapters.get(model)
        if adapter is None and not self.is_base(model) and await self._adapter_in_blobs(model):
            adapter = await self.load_adapter(model, model)
        if adapter is not None:
            return await self.engine(adapter.base), adapter
        try:
            validate_model_name(model)
        except ValueError:
            raise model_not_found(
                model, "it is neither a base model nor an adapter in the blob store"
            ) from None
        return await self.engine(model), None  # a base from the model store, or a 404

    async def _adapter_in_blobs(self, model: str) -> bool:
        if self.blobs is None:
            return False
        try:
            return await self.blobs.exists(f"{adapter_key(model, self.blobs).rstrip('/')}/{ADAPTER_CONFIG}")
        except (BlobStoreError, ValueError):
            return False

    def listing(self) -> list[dict[str, object]]:
        created = 0
        data: list[dict[str, object]] = [
            {
                "id": base,
                "object": "model",
                "created": created,
                "owned_by": "distillery",
                "root": base,
                "parent": None,
                "max_model_len": engine.context_window,
            }
            for base, engine in self.engines.items()
        ]
        data += [
            {
                "id": a.name,
                "object": "model",
                "created": created,
                "owned_by": "distillery",
                "root": a.source,
                "parent": a.base,
            }
            for a in self.adapters.values()
        ]
        return data

    def stop(self) -> None:
        for engine in self.engines.values():
            engine.stop()


def _builtin() -> tuple[str, ...]:
    from services.common.model_store import BUILTIN_MODELS

    return BUILTIN_MODELS
