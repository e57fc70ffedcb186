"""Production serving against vLLM's HTTP API, faked at its boundary: deploying an adapter copies it
from the blob store (a real S3 endpoint) to the adapter volume and loads it through vLLM's runtime LoRA
API, the probe must answer, retiring unloads it; the router sends the model to its base's vLLM."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from services.common.blobstore import BlobStore, blob_store_from_url
from services.common.events import CatalogRecord
from services.common.kafka import free_port
from services.common.settings import Settings
from services.router.catalog import RouterCatalog
from services.router.routing import ModelResolver
from services.serving.adapter_fetcher import create_app as fetcher_app
from services.serving.deploy import deploy_adapter, retire_adapter
from services.serving.vllm import ServingError

BASE = "meta-llama/Meta-Llama-3.1-8B-Instruct"


@dataclass
class FakeVLLM:
    """vLLM's OpenAI server with --enable-lora, as its HTTP API behaves (vLLM 0.8+ shapes)."""

    base: str
    loaded: dict[str, str] = field(default_factory=dict)  # lora name -> path
    refuse_loads: bool = False
    requests: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def app(self) -> FastAPI:
        app = FastAPI()

        def error(status: int, message: str, kind: str) -> JSONResponse:
            return JSONResponse(
                {"error": {"message": message, "type": kind, "param": None, "code": status}},
                status_code=status,
            )

        @app.post("/v1/load_lora_adapter")
        async def load(request: Request) -> Any:
            body = await request.json()
            self.requests.append(("load", body))
            name, path = body.get("lora_name"), body.get("lora_path")
            if self.refuse_loads:
                return error(500, "CUDA out of memory while loading the LoRA", "InternalServerError")
            if name in self.loaded:
                return error(400, f"The lora adapter '{name}' has already been loaded.", "InvalidUserInput")
            config = Path(path) / "adapter_config.json"
            if not config.is_file():  # vLLM reads the folder when it loads the adapter
                return error(400, f"No adapter found for {path}", "InvalidUserInput")
            json.loads(config.read_text())
            self.loaded[name] = path
            return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

        @app.post("/v1/unload_lora_adapter")
        async def unload(request: Request) -> Any:
            body = await request.json()
            self.requests.append(("unload", body))
            if self.loaded.pop(body.get("lora_name"), None) is None:
                return error(
                    404, f"The lora adapter '{body.get('lora_name')}' cannot be found.", "NotFoundError"
                )
            return PlainTextResponse(f"Success: LoRA adapter '{body['lora_name']}' removed successfully.")

        @app.get("/v1/models")
        async def models() -> dict[str, Any]:
            data = [{"id": self.base, "object": "model", "root": self.base, "parent": None}]
            data += [
                {"id": n, "object": "model", "root": p, "parent": self.base} for n, p in self.loaded.items()
            ]
            return {"object": "list", "data": data}

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Any:
            body = await request.json()
            self.requests.append(("chat", body))
            if body.get("model") not in (self.base, *self.loaded):
                return error(404, f"The model `{body.get('model')}` does not exist.", "NotFoundError")
            return {
                "id": f"chatcmpl-{secrets.token_hex(8)}",
                "object": "chat.completion",
                "created": 1,
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "pong"},
                        "finish_reason": "length",
                    }
                ],
                "usage": {"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10},
            }

        return app


@pytest.fixture
async def vllm() -> AsyncIterator[tuple[FakeVLLM, str]]:
    fake = FakeVLLM(BASE)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(fake.app(), host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.02)
    yield fake, f"http://127.0.0.1:{port}"
    server.should_exit = True
    await task


@pytest.fixture
async def s3_blobs(s3_url: str) -> BlobStore:
    blobs = blob_store_from_url(s3_url)
    await blobs.ensure_ready()
    return blobs


def visible_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


async def put_adapter(blobs: BlobStore, key: str) -> None:
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "base_model_name_or_path": BASE}
    await blobs.put_bytes(f"{key}/adapter_config.json", json.dumps(config).encode())
    await blobs.put_bytes(f"{key}/adapter_model.safetensors", b"\x00" * 64)


async def test_deploy_loads_the_adapter_into_vllm_and_probes_it(
    vllm: tuple[FakeVLLM, str], s3_blobs: BlobStore, tmp_path: Path
) -> None:
    fake, url = vllm
    settings = Settings(data_dir=tmp_path, vllm_servers={BASE: url}, vllm_adapter_dir=tmp_path / "adapters")
    key = f"fine_tunes/proj/m-{secrets.token_hex(3)}/job/adapter"
    await put_adapter(s3_blobs, key)

    served = await deploy_adapter(settings=settings, blobs=s3_blobs, base_model=BASE, adapter_key=key)
    assert served == key
    path = Path(fake.loaded[key])
    assert path.parent == tmp_path / "adapters"
    assert visible_files(path) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert [kind for kind, _ in fake.requests] == ["load", "chat"]
    assert fake.requests[1][1]["model"] == key and fake.requests[1][1]["max_tokens"] == 1

    # Deploying again (an api restart, a retried event) is harmless: vLLM says already loaded.
    await deploy_adapter(settings=settings, blobs=s3_blobs, base_model=BASE, adapter_key=key)

    await retire_adapter(settings=settings, blobs=s3_blobs, base_model=BASE, adapter_key=key)
    assert key not in fake.loaded
    await retire_adapter(settings=settings, blobs=s3_blobs, base_model=BASE, adapter_key=key)  # idempotent


async def test_deploy_through_the_adapter_fetcher_sidecar(
    vllm: tuple[FakeVLLM, str], s3_blobs: BlobStore, tmp_path: Path
) -> None:
    """The vLLM pod's sidecar copies the adapter onto the pod's volume; the api writes nothing locally."""
    fake, url = vllm
    volume = tmp_path / "pod-volume"
    port = free_port()
    sidecar = uvicorn.Server(
        uvicorn.Config(fetcher_app(s3_blobs, volume), host="127.0.0.1", port=port, log_level="warning")
    )
    task = asyncio.create_task(sidecar.serve())
    while not sidecar.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.02)
    try:
        settings = Settings(
            data_dir=tmp_path,
            vllm_servers={BASE: url},
            vllm_fetchers={BASE: f"http://127.0.0.1:{port}"},
            vllm_adapter_dir=tmp_path / "not-used",
        )
        key = f"fine_tunes/proj/m-{secrets.token_hex(3)}/job/adapter"
        await put_adapter(s3_blobs, key)
        await deploy_adapter(settings=settings, blobs=s3_blobs, base_model=BASE, adapter_key=key)
        assert Path(fake.loaded[key]).parent == volume
        assert not (tmp_path / "not-used").exists()
        with pytest.raises(ServingError, match="no adapter"):
            await deploy_adapter(
                settings=settings, blobs=s3_blobs, base_model=BASE, adapter_key="fine_tunes/gone/adapter"
            )
    finally:
        sidecar.should_exit = True
        await task


async def test_deploy_fails_clearly(vllm: tuple[FakeVLLM, str], s3_blobs: BlobStore, tmp_path: Path) -> None:
    fake, url = vllm
    settings = Settings(data_dir=tmp_path, vllm_servers={BASE: url}, vllm_adapter_dir=tmp_path / "adapters")
    with pytest.raises(ServingError, match="no adapter"):
        await deploy_adapter(
            settings=settings, blobs=s3_blobs, base_model=BASE, adapter_key="fine_tunes/none/adapter"
        )
    key = f"fine_tunes/proj/m-{secrets.token_hex(3)}/job/adapter"
    await put_adapter(s3_blobs, key)
    fake.refuse_loads = True
    with pytest.raises(ServingError, match="CUDA out of memory"):
        await deploy_adapter(settings=settings, blobs=s3_blobs, base_model=BASE, adapter_key=key)
    dead = Settings(data_dir=tmp_path, vllm_servers={BASE: f"http://127.0.0.1:{free_port()}"})
    with pytest.raises(ServingError, match="unreachable"):
        await deploy_adapter(settings=dead, blobs=s3_blobs, base_model=BASE, adapter_key=key)


def test_router_sends_fine_tuned_models_to_their_bases_vllm(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path, vllm_servers={BASE: "http://vllm-llama:8000"}, model_server_url="http://local:8091"
    )
    catalog = RouterCatalog(b"k" * 32)
    resolver = ModelResolver(catalog, settings)
    for slug, base in (("on-vllm", BASE), ("on-local", "distillery/tiny-chat")):
        catalog.apply(
            CatalogRecord(
                kind="model",
                id=f"p1/{slug}",
                data={
                    "project_id": "p1",
                    "slug": slug,
                    "status": "DEPLOYED",
                    "provider": "openpipe",
                    "base_model": base,
                    "adapter_uri": f"fine_tunes/p1/{slug}/adapter",
                },
            )
        )
    route = resolver.resolve("p1", "openpipe:on-vllm")
    assert (route.base_url, route.upstream_model) == (
        "http://vllm-llama:8000/v1",
        "fine_tunes/p1/on-vllm/adapter",
    )
    assert resolver.resolve("p1", "openpipe:on-local").base_url == "http://local:8091/v1"
    base = resolver.resolve("p1", f"openpipe:base/{BASE}")
    assert (base.base_url, base.upstream_model) == ("http://vllm-llama:8000/v1", BASE)


VLLM_VALUES = {
    "secretKey": "a" * 43 + "=",
    "vllm": {
        "enabled": True,
        "models": [
            {"name": "llama-8b", "baseModel": BASE, "modelPath": "/models/llama-8b"},
            {"name": "qwen-14b", "baseModel": "Qwen/Qwen2.5-14B-Instruct", "gpus": 2, "maxLoras": 4},
        ],
        "modelVolume": {"existingClaim": "base-weights"},
    },
}


def test_chart_deploys_a_vllm_server_per_base_model(monkeypatch: pytest.MonkeyPatch) -> None:
    import kubernetes_validate
    import yaml
    from helm_python import Chart
    from helm_python import chart as helm_chart

    from tests.helpers import CHART_DIR, KUBERNETES_VERSION

    manifests = Chart.load(CHART_DIR).render(
        values=VLLM_VALUES, name="distillery", namespace="distillery", is_install=True
    )
    documents = [
        doc
        for path, text in manifests.items()
        if not path.endswith("NOTES.txt")
        for doc in yaml.safe_load_all(text)
    ]
    documents = [doc for doc in documents if doc]
    for doc in documents:
        if doc["kind"] in ("Deployment", "Service", "ConfigMap"):
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    deployments = {d["metadata"]["name"]: d for d in documents if d["kind"] == "Deployment"}
    services = {d["metadata"]["name"]: d for d in documents if d["kind"] == "Service"}
    qwen = deployments["distillery-vllm-qwen-14b"]["spec"]["template"]["spec"]
    vllm, fetcher = qwen["containers"]
    args = vllm["args"]
    assert args[args.index("--model") + 1] == "Qwen/Qwen2.5-14B-Instruct"
    assert "--enable-lora" in args and args[args.index("--max-loras") + 1] == "4"
    assert args[args.index("--tensor-parallel-size") + 1] == "2"
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert {"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"} in vllm["env"]
    assert qwen["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert fetcher["command"][:3] == ["python", "-m", "services.serving.adapter_fetcher"]
    assert [e["name"] for e in fetcher["env"]] == [
        "DISTILLERY_VLLM_ADAPTER_DIR",
        "DISTILLERY_DATA_DIR",
        "DISTILLERY_BLOB_URL",
    ]
    llama = deployments["distillery-vllm-llama-8b"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert llama[llama.index("--model") + 1] == "/models/llama-8b"
    assert llama[llama.index("--served-model-name") + 1] == BASE
    assert {p["name"] for p in services["distillery-vllm-llama-8b"]["spec"]["ports"]} == {"http", "fetcher"}

    config = next(d for d in documents if d["kind"] == "ConfigMap" and "DISTILLERY_KAFKA_URL" in d["data"])
    servers = json.loads(config["data"]["DISTILLERY_VLLM_SERVERS"])
    fetchers = json.loads(config["data"]["DISTILLERY_VLLM_FETCHERS"])
    assert servers[BASE] == "http://distillery-vllm-llama-8b:8000"
    assert fetchers["Qwen/Qwen2.5-14B-Instruct"] == "http://distillery-vllm-qwen-14b:8001"
    # The settings the api and router read parse that JSON from the environment.
    monkeypatch.setenv("DISTILLERY_VLLM_SERVERS", config["data"]["DISTILLERY_VLLM_SERVERS"])
    assert Settings().vllm_servers == servers

    report = helm_chart.lint(CHART_DIR, VLLM_VALUES, strict=True, kube_version=f"v{KUBERNETES_VERSION}")
    problems = [m for m in report["messages"] if m["severity"] >= 2 and "icon" not in m["error"]]
    assert not report["errors"] and not problems, report
