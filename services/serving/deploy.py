"""Deploying a trained adapter: make it available to the server of its base model, then prove it
answers. Called by the api when a training run succeeds (the Model stays ``PROVISIONING`` until
``deploy_adapter`` returns; then DEPLOYED, or ERROR with the reason) and when a Model is deleted.

Which server: ``settings.vllm_servers[base]`` when set (production: the adapter is copied to the
vLLM adapter volume and loaded through vLLM's runtime LoRA API), else the local model server
(``settings.resolved_model_server_url()``), which fetches adapters from the blob store itself.
Either way the served name is the adapter's blob key — what the router sends as ``model``.
"""

from __future__ import annotations

import logging

import httpx

from services.common.blobstore import BlobStore
from services.common.settings import Settings
from services.serving.vllm import ServerUnreachable, ServingError, VLLMServer, error_message

log = logging.getLogger(__name__)

PROBE_MESSAGES = [{"role": "user", "content": "ping"}]


def server_url(settings: Settings, base_model: str) -> str:
    """Base URL (without /v1) of the server for ``base_model``."""
    return (settings.vllm_servers.get(base_model) or settings.resolved_model_server_url()).rstrip("/")


async def probe(http: httpx.AsyncClient, url: str, model: str) -> None:
    """One tiny greedy completion: the adapter is loaded and generating, or ServingError says why."""
    body = {"model": model, "messages": PROBE_MESSAGES, "max_tokens": 1, "temperature": 0}
    try:
        response = await http.post(f"{url}/v1/chat/completions", json=body)
    except httpx.HTTPError as exc:
        raise ServerUnreachable(f"the model server at {url} is unreachable: {type(exc).__name__}") from None
    if response.status_code != 200:
        raise ServingError(f"the probe request failed ({response.status_code}): {error_message(response)}")
    choices = response.json().get("choices")
    if not isinstance(choices, list) or not choices:
        raise ServingError("the probe request got an answer without choices")


async def deploy_adapter(
    *,
    settings: Settings,
    blobs: BlobStore,
    base_model: str,
    adapter_key: str,
    http: httpx.AsyncClient | None = None,
    timeout: float = 300.0,
) -> str:
    """Load the adapter on its base's server and probe it; returns the name it is served under."""
    url = server_url(settings, base_model)
    async with _client(http, timeout) as client:
        if base_model in settings.vllm_servers:
            vllm = VLLMServer(
                url,
                adapter_dir=settings.vllm_adapter_dir,
                blobs=blobs,
                http=client,
                fetcher_url=settings.vllm_fetchers.get(base_model),
            )
            await vllm.load_adapter(adapter_key, adapter_key)
        else:
            body = {"lora_name": adapter_key, "lora_path": adapter_key, "base_model": base_model}
            try:
                response = await client.post(f"{url}/v1/load_lora_adapter", json=body)
            except httpx.HTTPError as exc:
                raise ServerUnreachable(
                    f"the model server at {url} is unreachable: {type(exc).__name__}"
                ) from None
            if response.status_code != 200:
                message = error_message(response)
                raise ServingError(
                    f"the model server refused the adapter ({response.status_code}): {message}"
                )
        await probe(client, url, adapter_key)
    log.info("adapter %s deployed on %s (base %s)", adapter_key, url, base_model)
    return adapter_key


async def retire_adapter(
    *,
    settings: Settings,
    blobs: BlobStore,
    base_model: str,
    adapter_key: str,
    http: httpx.AsyncClient | None = None,
) -> None:
    """Unload a deleted model's adapter; a server that is down or never had it is not an error."""
    url = server_url(settings, base_model)
    async with _client(http, 30.0) as client:
        try:
            if base_model in settings.vllm_servers:
                vllm = VLLMServer(url, adapter_dir=settings.vllm_adapter_dir, blobs=blobs, http=client)
                await vllm.unload_adapter(adapter_key)
            else:
                await client.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": adapter_key})
        except (ServingError, httpx.HTTPError) as exc:
            log.warning("unloading adapter %s from %s failed: %s", adapter_key, url, exc)


class _client:
    """The caller's client, or a fresh one closed on exit."""

    def __init__(self, http: httpx.AsyncClient | None, timeout: float) -> None:
        self.owned = http is None
        self.http = http or httpx.AsyncClient(timeout=timeout)

    async def __aenter__(self) -> httpx.AsyncClient:
        return self.http

    async def __aexit__(self, *exc: object) -> None:
        if self.owned:
            await self.http.aclose()
