"""Production serving: a vLLM OpenAI server per base model, with LoRA enabled
(``--enable-lora --max-loras N``, ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``; see
``helm/distillery/templates/vllm-*.yaml``).

The platform makes an adapter available to its base's server in two steps: copy it from the blob
store onto the adapter volume the server reads — by the adapter-fetcher sidecar in the vLLM pod
(``python -m services.serving.adapter_fetcher``, ``settings.vllm_fetchers[base]``), or by this
process into ``vllm_adapter_dir`` when that volume is shared — then load it through vLLM's
runtime LoRA API (``POST /v1/load_lora_adapter {"lora_name", "lora_path"}``). The served name is
the adapter's blob key, the same name the local model server answers to, so the router's route
is one shape for both.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path
from typing import Any

import httpx

from services.common.blobstore import BlobNotFound, BlobStore, BlobStoreError

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
_COMPLETE = ".complete"


class ServingError(Exception):
    """A model server refused or failed to make a model servable; the message says why."""


class ServerUnreachable(ServingError):
    """The model server did not answer at all (starting, restarting): worth trying again."""


def error_message(response: httpx.Response) -> str:
    """vLLM answers errors as ``{"error": {...}}`` (recent) or ``{"object": "error", "message"}`` (older)."""
    try:
        body: Any = response.json()
    except ValueError:
        return response.text[:500] or f"HTTP {response.status_code}"
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if body.get("message"):
            return str(body["message"])
    return response.text[:500]


def local_adapter_path(adapter_dir: Path, adapter_key: str) -> Path:
    digest = hashlib.sha256(adapter_key.encode()).hexdigest()[:16]
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in adapter_key.strip("/"))[-80:]
    return Path(adapter_dir) / f"{safe}-{digest}"


async def fetch_adapter(blobs: BlobStore, adapter_dir: Path, adapter_key: str) -> Path:
    """Copy the adapter folder from the blob store into ``adapter_dir`` (once; atomically)."""
    target = local_adapter_path(adapter_dir, adapter_key)
    if (target / _COMPLETE).exists():
        return target
    prefix = adapter_key.strip("/") + "/"
    try:
        keys = await blobs.list(prefix)
    except (BlobStoreError, ValueError) as exc:
        raise ServingError(f"cannot list the adapter {adapter_key!r} in the blob store: {exc}") from None
    if prefix + ADAPTER_CONFIG not in keys:
        raise ServingError(f"no adapter (adapter_config.json) under {adapter_key!r} in the blob store")
    scratch = target.with_name(target.name + ".partial")
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        for key in keys:
            await blobs.download_file(key, scratch / key[len(prefix) :])
    except (BlobNotFound, BlobStoreError) as exc:
        shutil.rmtree(scratch, ignore_errors=True)
        raise ServingError(f"cannot fetch the adapter {adapter_key!r} from the blob store: {exc}") from None
    (scratch / _COMPLETE).write_text(adapter_key)
    shutil.rmtree(target, ignore_errors=True)
    scratch.rename(target)
    return target


class VLLMServer:
    """One vLLM server (one base model) and the adapter volume it reads LoRA adapters from."""

    def __init__(
        self,
        base_url: str,
        *,
        adapter_dir: Path,
        blobs: BlobStore,
        http: httpx.AsyncClient | None = None,
        fetcher_url: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.fetcher_url = fetcher_url.rstrip("/") if fetcher_url else None
        self.adapter_dir = Path(adapter_dir)
        self.blobs = blobs
        self._http = http or httpx.AsyncClient(timeout=60)

    async def close(self) -> None:
        await self._http.aclose()

    async def fetch_adapter(self, adapter_key: str) -> Path:
        """The adapter on the volume vLLM reads: copied there by this process (a volume shared with
        the vLLM pods) or, with ``fetcher_url``, by the adapter-fetcher sidecar in the vLLM pod."""
        if not self.fetcher_url:
            return await fetch_adapter(self.blobs, self.adapter_dir, adapter_key)
        try:
            response = await self._http.post(f"{self.fetcher_url}/fetch", json={"adapter_key": adapter_key})
        except httpx.HTTPError as exc:
            raise ServerUnreachable(
                f"the adapter fetcher at {self.fetcher_url} is unreachable: {type(exc).__name__}"
            ) from None
        if response.status_code != 200:
            raise ServingError(
                f"the adapter fetcher failed ({response.status_code}): {error_message(response)}"
            )
        return Path(response.json()["path"])

    async def load_adapter(self, name: str, adapter_key: str) -> None:
        """Fetch the adapter to the volume and load it into vLLM (already loaded counts as done)."""
        path = await self.fetch_adapter(adapter_key)
        response = await self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)})
        if response.status_code == 200:
            log.info("vLLM %s loaded adapter %s from %s", self.base_url, name, path)
            return
        message = error_message(response)
        if response.status_code == 400 and "already been loaded" in message:
            return
        raise ServingError(f"vLLM refused to load the adapter {name!r} ({response.status_code}): {message}")

    async def unload_adapter(self, name: str) -> None:
        """Unload from vLLM; an adapter vLLM does not have counts as unloaded."""
        response = await self._post("/v1/unload_lora_adapter", {"lora_name": name})
        if (
            response.status_code == 200
            or response.status_code in (400, 404)
            and ("cannot be found" in error_message(response) or response.status_code == 404)
        ):
            return
        raise ServingError(
            f"vLLM refused to unload {name!r} ({response.status_code}): {error_message(response)}"
        )

    async def served_models(self) -> list[str]:
        try:
            response = await self._http.get(f"{self.base_url}/v1/models")
        except httpx.HTTPError as exc:
            raise ServerUnreachable(f"vLLM at {self.base_url} is unreachable: {type(exc).__name__}") from None
        if response.status_code != 200:
            raise ServingError(f"vLLM /v1/models answered {response.status_code}: {error_message(response)}")
        return [m["id"] for m in response.json().get("data", [])]

    async def _post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        try:
            return await self._http.post(f"{self.base_url}{path}", json=body)
        except httpx.HTTPError as exc:
            raise ServerUnreachable(f"vLLM at {self.base_url} is unreachable: {type(exc).__name__}") from None
