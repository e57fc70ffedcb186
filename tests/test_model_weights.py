"""GET /models/{slug}/weights: the adapter as trained, or merged into the base; the merged weights load
in plain transformers and generate the same greedy tokens as the adapter served by the model server."""

from __future__ import annotations

import asyncio
import io
import json
import secrets
import tarfile
from pathlib import Path

import httpx
import pytest

from tests.conftest import Project, RunningPlatform, wait_until
from tests.helpers_serving import HELLO, HELLO_ANSWER, TEST_BASE, serving_assets


async def add_model(
    running: RunningPlatform, project: Project, slug: str, *, adapter_uri: str | None, status: str
) -> None:
    from services.api.fine_tuning.models import FineTunedModel
    from services.common.clock import now

    async with running.platform.state["sessions"].begin() as session:
        session.add(
            FineTunedModel(
                id=f"model-{secrets.token_hex(6)}",
                project_id=project.id,
                slug=slug,
                dataset_id="ds-weights",
                provider="openpipe",
                base_model=TEST_BASE,
                hyperparameters={"num_epochs": 3, "learning_rate_multiplier": 1.0, "batch_size": "auto"},
                pruning_rule_ids=[],
                pruning_rules=[],
                status=status,
                adapter_uri=adapter_uri,
                trained_tokens=1234,
                created_at=now(),
                updated_at=now(),
            )
        )


async def put_weights(running: RunningPlatform, project: Project) -> str:
    """The test base in the platform's model store and adapter A in its blob store; the adapter key."""
    from services.common.model_store import upload_model

    assets = serving_assets()
    blobs = running.platform.blobs
    if not await blobs.exists(f"models/{TEST_BASE}/config.json"):
        await asyncio.to_thread(upload_model, TEST_BASE, assets.base_dir, blobs)
    key = f"fine_tunes/{project.id}/exported/job/adapter"
    for path in sorted(assets.adapter_a_dir.iterdir()):
        await blobs.put_file(f"{key}/{path.name}", path)
    return key


def untar(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        return {m.name: archive.extractfile(m).read() for m in archive.getmembers() if m.isfile()}


def greedy_tokens(folder: Path, max_new_tokens: int) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    prompt = tokenizer.apply_chat_template(HELLO, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    out = model.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


async def test_export_adapter_and_merged_weights(
    running: RunningPlatform, project: Project, make_project, tmp_path: Path
) -> None:
    key = await put_weights(running, project)
    await add_model(running, project, "exported", adapter_uri=key, status="DEPLOYED")
    assets = serving_assets()
    async with project.client() as http:
        http.timeout = httpx.Timeout(120)
        adapter = await http.get("/models/exported/weights", params={"format": "adapter"})
        assert adapter.status_code == 200, adapter.text
        assert adapter.headers["content-type"] == "application/x-tar"
        assert 'filename="exported-adapter.tar"' in adapter.headers["content-disposition"]
        files = untar(adapter.content)
        original = (assets.adapter_a_dir / "adapter_model.safetensors").read_bytes()
        assert files["exported/adapter_model.safetensors"] == original
        assert "exported/adapter_config.json" in files and "exported/tokenizer.json" in files
        card = json.loads(files["exported/distillery_model.json"])
        assert card["base_model"] == TEST_BASE and card["dataset_id"] == "ds-weights"
        assert card["hyperparameters"]["num_epochs"] == 3 and card["trained_tokens"] == 1234
        assert f"base_model: {TEST_BASE}" in files["exported/README.md"].decode()

        merged = await http.get("/models/exported/weights", params={"format": "merged"})
        assert merged.status_code == 200, merged.text
    files = untar(merged.content)
    assert "exported/model.safetensors" in files and "exported/config.json" in files
    folder = tmp_path / "merged"
    folder.mkdir()
    for name, data in files.items():
        (folder / Path(name).name).write_bytes(data)
    assert not any(n.startswith("exported/adapter") for n in files)
    merged_answer = await asyncio.to_thread(greedy_tokens, folder, 24)
    assert merged_answer == HELLO_ANSWER

    # The same greedy tokens as the adapter served by the platform's model server (its child process).
    url = running.settings.resolved_model_server_url()

    async def server_up() -> bool:
        try:
            async with httpx.AsyncClient() as client:
                return (await client.get(f"{url}/health")).status_code == 200
        except httpx.HTTPError:
            return False

    await wait_until(server_up, timeout=120, what="the platform's model server")
    async with httpx.AsyncClient(timeout=120) as client:
        served = await client.post(
            f"{url}/v1/chat/completions",
            json={"model": key, "messages": HELLO, "temperature": 0, "max_tokens": 24},
        )
    assert served.status_code == 200, served.text
    assert served.json()["choices"][0]["message"]["content"] == merged_answer


async def test_export_refusals(running: RunningPlatform, project: Project, make_project) -> None:
    key = await put_weights(running, project)
    await add_model(running, project, "mine", adapter_uri=key, status="DEPLOYED")
    await add_model(running, project, "untrained", adapter_uri=None, status="TRAINING")
    await add_model(running, project, "lost", adapter_uri="fine_tunes/gone/adapter", status="DEPLOYED")
    other = await make_project()
    async with other.client() as http:
        foreign = await http.get("/models/mine/weights")
    assert foreign.status_code == 404
    async with project.client() as http:
        unknown = await http.get("/models/nope/weights")
        assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "slug"
        bad = await http.get("/models/mine/weights", params={"format": "zip"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "format"
        untrained = await http.get("/models/untrained/weights")
        assert untrained.status_code == 409 and "TRAINING" in untrained.json()["message"]
        lost = await http.get("/models/lost/weights")
        assert lost.status_code == 410 and "missing from the blob store" in lost.json()["message"]
        anonymous = await httpx.AsyncClient(base_url=project.base_url).get("/models/mine/weights")
        assert anonymous.status_code == 401


pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
