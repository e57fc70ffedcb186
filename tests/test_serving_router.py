"""``openpipe:<slug>`` end to end: a catalog Model (as the fine-tuning api publishes it on catalog.v1)
routed by the platform to the local model server, run as its own process (``python -m
services.serving``) over a tiny base and adapters trained for real, driven by the openai SDK."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import openai
import pytest

from services.common.events import CATALOG_TOPIC, CatalogRecord
from services.common.kafka import free_port
from tests.conftest import Project, RunningPlatform, wait_for_count, wait_until
from tests.helpers_serving import HELLO, HELLO_ANSWER, TEST_BASE, serving_assets

PRUNED_TEXT = "Ignore everything in this sentence, it is boilerplate the rule removes."


class ModelServer:
    """``python -m services.serving`` in a child process, over the test assets' blob store."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {
            **os.environ,
            "DISTILLERY_DATA_DIR": str(self.data_dir),
            "DISTILLERY_BLOB_URL": serving_assets().blob_root.as_uri(),
            "DISTILLERY_MODEL_SERVER_MAX_BATCH": "8",
            "HF_HUB_OFFLINE": "1",
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "services.serving", "--port", str(self.port), "--preload", TEST_BASE],
            env=env,
            stdout=open(self.data_dir / "server.log", "ab"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert self.process.poll() is None, (self.data_dir / "server.log").read_text()[-3000:]
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError("model server did not start")

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()


@pytest.fixture(scope="module")
def model_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelServer]:
    serving_assets()  # built before the server starts
    server = ModelServer(tmp_path_factory.mktemp("model-server"))
    server.start()
    yield server
    server.kill()


@pytest.fixture
async def served_platform(
    running: RunningPlatform, model_server: ModelServer
) -> AsyncIterator[RunningPlatform]:
    previous = running.settings.model_server_url
    running.settings.model_server_url = model_server.url
    yield running
    running.settings.model_server_url = previous


def sdk(project: Project) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key=project.key, base_url=project.base_url, max_retries=0)


async def publish_model(running: RunningPlatform, project: Project, slug: str, **data: object) -> None:
    """A Model record exactly as the fine-tuning api publishes it, then wait for the router to have it."""
    record = CatalogRecord(
        kind="model",
        id=f"{project.id}/{slug}",
        deleted=bool(data.pop("deleted", False)),
        data={
            "project_id": project.id,
            "slug": slug,
            "status": "DEPLOYED",
            "provider": "openpipe",
            "base_model": TEST_BASE,
            "adapter_uri": serving_assets().adapter_a,
            "pruning_rules": [],
            "default_temperature": None,
            "input_price_per_million": 0.30,
            "output_price_per_million": 0.45,
            **data,
        },
    )
    await running.platform.broker.publish(
        record.model_dump(mode="json"), CATALOG_TOPIC, key=record.key.encode()
    )
    catalog = running.platform.state["chat"].resolver.catalog

    def applied() -> bool:
        found = catalog.fine_tuned_model(project.id, slug)
        return (
            found is None if record.deleted else found is not None and found.status == record.data["status"]
        )

    await wait_until(applied, what=f"model {slug} on the router")


async def test_fine_tuned_model_through_the_router(
    served_platform: RunningPlatform, project: Project
) -> None:
    await publish_model(served_platform, project, "greeter", pruning_rules=[PRUNED_TEXT])
    client = sdk(project)
    # The system message is all boilerplate: pruned away, the adapter sees the prompt it was trained on.
    messages = [{"role": "system", "content": PRUNED_TEXT}, *HELLO]
    completion = await client.chat.completions.create(
        model="openpipe:greeter", messages=messages, temperature=0, store=True, metadata={"case": "ft-json"}
    )
    assert completion.choices[0].message.content == HELLO_ANSWER
    assert completion.model == "openpipe:greeter"

    # The pruning rule was applied before the request reached the model server.
    async with httpx.AsyncClient(base_url=served_platform.settings.model_server_url) as direct:
        usage = {}
        for name, body in (("pruned", HELLO), ("unpruned", messages)):
            response = await direct.post(
                "/v1/chat/completions",
                json={"model": serving_assets().adapter_a, "messages": body, "max_tokens": 1},
            )
            usage[name] = response.json()["usage"]["prompt_tokens"]
    assert completion.usage.prompt_tokens == usage["pruned"] < usage["unpruned"]

    stream = await client.chat.completions.create(
        model="openpipe:greeter",
        messages=HELLO,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        store=True,
        metadata={"case": "ft-stream"},
    )
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == HELLO_ANSWER
    assert chunks[-1].usage.completion_tokens > 0

    async with project.client() as http:
        await wait_for_count(http, 2)
        logged = (await http.get("/logs", params={"metadata.case": "ft-json"})).json()["data"][0]
    expected = (completion.usage.prompt_tokens * 0.30 + completion.usage.completion_tokens * 0.45) / 1e6
    assert logged["cost"] == pytest.approx(expected)
    assert logged["statusCode"] == 200


async def test_default_temperature_and_base_models(
    served_platform: RunningPlatform, project: Project
) -> None:
    await publish_model(served_platform, project, "cold", default_temperature=0.0)
    client = sdk(project)
    unseen = [{"role": "user", "content": "The quick brown fox jumps over"}]
    async with httpx.AsyncClient(base_url=served_platform.settings.model_server_url) as direct:
        greedy = (
            await direct.post(
                "/v1/chat/completions",
                json={
                    "model": serving_assets().adapter_a,
                    "messages": unseen,
                    "max_tokens": 12,
                    "temperature": 0,
                },
            )
        ).json()["choices"][0]["message"]["content"]
    # No temperature in the request: the model's defaultTemperature (0) applies, so it answers greedily.
    answers = [
        (await client.chat.completions.create(model="openpipe:cold", messages=unseen, max_tokens=12))
        .choices[0]
        .message.content
        for _ in range(2)
    ]
    assert answers == [greedy, greedy]

    # The base model itself, without an adapter: answers, and differently from the fine-tuned one.
    base = await client.chat.completions.create(
        model=f"openpipe:base/{TEST_BASE}", messages=HELLO, temperature=0, max_tokens=6
    )
    assert base.choices[0].message.content != HELLO_ANSWER
    assert base.model == f"openpipe:base/{TEST_BASE}"
    with pytest.raises(openai.NotFoundError) as unknown_base:
        await client.chat.completions.create(model="openpipe:base/nobody/none", messages=HELLO)
    assert unknown_base.value.body["code"] == "model_not_found"


async def test_unservable_models_fail_clearly(
    served_platform: RunningPlatform, make_project, project: Project
) -> None:
    client = sdk(project)
    with pytest.raises(openai.NotFoundError) as unknown:
        await client.chat.completions.create(model="openpipe:no-such-slug", messages=HELLO)
    assert unknown.value.body["code"] == "model_not_found"

    await publish_model(served_platform, project, "ghost", adapter_uri="fine_tunes/p/ghost/job/adapter")
    with pytest.raises(openai.NotFoundError) as ghost:
        await client.chat.completions.create(model="openpipe:ghost", messages=HELLO)
    assert "blob store" in ghost.value.message

    await publish_model(served_platform, project, "old", status="DEPRECATED")
    with pytest.raises(openai.BadRequestError) as deprecated:
        await client.chat.completions.create(model="openpipe:old", messages=HELLO)
    assert deprecated.value.body["code"] == "model_deprecated"
    assert "deprecated" in deprecated.value.message

    await publish_model(served_platform, project, "training", status="TRAINING")
    with pytest.raises(openai.BadRequestError) as training:
        await client.chat.completions.create(model="openpipe:training", messages=HELLO)
    assert training.value.body["code"] == "model_not_deployed"

    await publish_model(served_platform, project, "doomed")
    await client.chat.completions.create(model="openpipe:doomed", messages=HELLO, max_tokens=2)
    await publish_model(served_platform, project, "doomed", deleted=True)
    with pytest.raises(openai.NotFoundError) as deleted:
        await client.chat.completions.create(model="openpipe:doomed", messages=HELLO)
    assert deleted.value.body["code"] == "model_not_found"

    # Another project cannot call this project's model, even knowing its slug.
    await publish_model(served_platform, project, "private")
    other = await make_project()
    with pytest.raises(openai.NotFoundError) as foreign:
        await sdk(other).chat.completions.create(model="openpipe:private", messages=HELLO)
    assert foreign.value.body["code"] == "model_not_found"


async def test_model_server_restarted_mid_stream(
    served_platform: RunningPlatform, model_server: ModelServer, project: Project
) -> None:
    await publish_model(served_platform, project, "long-winded")
    client = sdk(project)
    stream = await client.chat.completions.create(
        model=f"openpipe:base/{TEST_BASE}",
        messages=[{"role": "user", "content": "Tell me a long story"}],
        max_tokens=900,
        temperature=1.0,
        stream=True,
        store=True,
        metadata={"case": "restart"},
    )
    received = 0
    with pytest.raises(openai.APIError) as broken:
        async for _chunk in stream:
            received += 1
            if received == 3:
                model_server.kill()
    assert received >= 3
    assert "broke the stream" in str(broken.value) or "stream" in str(broken.value).lower()

    async with project.client() as http:
        await wait_for_count(http, 1, params={"metadata.case": "restart"})
        failed = (await http.get("/logs", params={"metadata.case": "restart"})).json()["data"][0]
    assert failed["statusCode"] == 502 and failed["errorMessage"]

    # Back up, the server fetches the adapter again from the blob store on first use.
    await asyncio.to_thread(model_server.start)
    completion = await client.chat.completions.create(
        model="openpipe:long-winded", messages=HELLO, temperature=0
    )
    assert completion.choices[0].message.content == HELLO_ANSWER


async def provisioning_model(running: RunningPlatform, project: Project, slug: str, adapter_uri: str) -> None:
    """A trained Model as the fine-tuning api leaves it (PROVISIONING), published on catalog.v1."""
    from services.api.fine_tuning import service as fine_tuning
    from services.api.fine_tuning.models import FineTunedModel
    from services.common.clock import now

    async with running.platform.state["sessions"].begin() as session:
        model = FineTunedModel(
            id=f"model-{slug}-{project.id[-6:]}",
            project_id=project.id,
            slug=slug,
            dataset_id="ds-test",
            provider="openpipe",
            base_model=TEST_BASE,
            hyperparameters={},
            pruning_rule_ids=[],
            pruning_rules=[],
            status="PROVISIONING",
            adapter_uri=adapter_uri,
            created_at=now(),
            updated_at=now(),
        )
        session.add(model)
        await session.flush()
        await fine_tuning.publish_records(
            broker=running.platform.broker, records=[fine_tuning.model_record(model, None)], timeout=10
        )


async def test_trained_model_is_deployed_only_once_its_adapter_answers(
    served_platform: RunningPlatform, project: Project
) -> None:
    await provisioning_model(served_platform, project, "fresh", serving_assets().adapter_b)
    await provisioning_model(served_platform, project, "broken", "fine_tunes/p/broken/job/adapter")
    client = sdk(project)
    with pytest.raises(openai.BadRequestError) as early:  # not callable while provisioning
        await client.chat.completions.create(model="openpipe:broken", messages=HELLO)
    assert early.value.body["code"] == "model_not_deployed"

    async def status(slug: str) -> dict:
        async with project.client() as http:
            return (await http.get(f"/models/{slug}")).json()["openpipe"]

    await wait_until(lambda: _status_is(status, "fresh", "DEPLOYED"), timeout=60, what="fresh DEPLOYED")
    answer = await client.chat.completions.create(model="openpipe:fresh", messages=HELLO, temperature=0)
    assert answer.choices[0].message.content == "Bonjour from B!"

    await wait_until(lambda: _status_is(status, "broken", "ERROR"), timeout=60, what="broken ERROR")
    broken = await status("broken")
    assert "Deployment failed" in broken["errorMessage"] and "blob store" in broken["errorMessage"]


async def _status_is(status, slug: str, expected: str) -> bool:
    return (await status(slug))["status"] == expected
