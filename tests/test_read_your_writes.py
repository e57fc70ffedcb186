"""Read your writes, and streamed calls priced with real token counts.

A provider key, external provider, deployment or API key written through the API is usable by the
very next request in the same process: the api hands each catalog record it publishes to the
in-process catalog reader at once, instead of waiting for ``catalog.v1`` to bring it back
(services/common/catalog.CatalogReader.apply). Streams: the router always asks the upstream for
the usage tail and drops it for a client that did not ask.
"""

from __future__ import annotations

import asyncio

import httpx
import orjson
import pytest

from services.api.providers import service as providers
from services.api.providers.models import ProviderKeysUpdate
from services.common.errors import APIError
from services.router.routing import model_not_found
from services.router.service import ChatService
from tests.conftest import Project, RunningPlatform, wait_for_count
from tests.fake_upstream import ANTHROPIC_KEY, GEMINI_KEY, OPENAI_KEY, FakeUpstream

MESSAGES = [{"role": "user", "content": "Count to 3"}]


async def chat(client: httpx.AsyncClient, model: str, **extra: object) -> httpx.Response:
    return await client.post("/chat/completions", json={"model": model, "messages": MESSAGES, **extra})


async def test_provider_keys_are_usable_by_the_very_next_request(project: Project) -> None:
    async with project.client() as client:
        missing = await chat(client, "gpt-4o-mini")
        assert missing.status_code == 400 and missing.json()["error"]["code"] == "provider_key_missing"
        assert (await client.put("/provider-keys", json={"openai": OPENAI_KEY})).status_code == 200
        answered = await chat(client, "gpt-4o-mini")  # no retry, no wait
        assert answered.status_code == 200, answered.text
        assert (await client.put("/provider-keys", json={"openai": None})).status_code == 200
        removed = await chat(client, "gpt-4o-mini")
        assert removed.status_code == 400, removed.text


async def test_external_providers_are_usable_by_the_very_next_request(
    project: Project, fake_upstream: FakeUpstream
) -> None:
    provider = {
        "slug": "ryw",
        "type": "openai",
        "baseUrl": f"{fake_upstream.base_url}/v1",
        "apiKey": OPENAI_KEY,
        "models": [{"slug": "first-model"}],
    }
    async with project.client() as client:
        created = await client.post("/external-providers", json=provider)
        assert created.status_code == 201, created.text
        answered = await chat(client, "openpipe:ryw/first-model")
        assert answered.status_code == 200, answered.text
        patched = await client.patch(
            f"/external-providers/{created.json()['id']}", json={"models": [{"slug": "second-model"}]}
        )
        assert patched.status_code == 200, patched.text
        assert (await chat(client, "openpipe:ryw/second-model")).status_code == 200
        assert fake_upstream.last("/v1/chat/completions").body["model"] == "second-model"
        gone = await chat(client, "openpipe:ryw/first-model")
        assert gone.status_code == 404, gone.text
        assert (await client.delete(f"/external-providers/{created.json()['id']}")).status_code == 200
        assert (await chat(client, "openpipe:ryw/second-model")).status_code == 404


async def test_deployments_read_the_latest_write_even_when_older_records_arrive_later(
    project: Project, fake_upstream: FakeUpstream
) -> None:
    """Two quick writes: the topic brings the first back after the second was applied locally, and
    that older copy must not undo the newer one."""
    spec = {"baseUrl": f"{fake_upstream.base_url}/v1", "apiKey": OPENAI_KEY}
    async with project.client() as client:
        for model in ("upstream-one", "upstream-two"):
            response = await client.put("/deployments/ryw-model", json={**spec, "model": model})
            assert response.status_code in (200, 201), response.text
        for _ in range(3):  # now, and after catalog.v1 has delivered both records
            answered = await chat(client, "openpipe:ryw-model")
            assert answered.status_code == 200, answered.text
            assert fake_upstream.last("/v1/chat/completions").body["model"] == "upstream-two"
            await asyncio.sleep(0.4)
        assert (await client.delete("/deployments/ryw-model")).status_code == 200
        assert (await chat(client, "openpipe:ryw-model")).status_code == 404


async def test_a_new_api_key_works_at_once(project: Project) -> None:
    async with project.client() as client:
        created = await client.post("/keys")
        assert created.status_code == 201, created.text
    async with httpx.AsyncClient(
        base_url=project.base_url, headers={"Authorization": f"Bearer {created.json()['key']}"}
    ) as fresh:
        assert (await fresh.get("/datasets")).status_code == 200


def _events(body: bytes) -> list[dict]:
    lines = [line[len(b"data: ") :] for line in body.split(b"\n\n") if line.startswith(b"data: ")]
    return [orjson.loads(line) for line in lines if line != b"[DONE]"]


async def test_streams_always_ask_for_usage_and_log_real_token_counts(
    project: Project, fake_upstream: FakeUpstream
) -> None:
    async with project.client() as client:
        assert (await client.put("/provider-keys", json={"openai": OPENAI_KEY})).status_code == 200
        plain = await chat(client, "gpt-4o-mini", stream=True, store=True, metadata={"case": "plain"})
        assert plain.status_code == 200, plain.text
        sent = fake_upstream.last("/v1/chat/completions").body
        assert sent["stream_options"] == {"include_usage": True}
        events = _events(plain.content)
        assert events and all("usage" not in e for e in events), events[-2:]
        assert all(e["choices"] for e in events)  # no usage tail the client did not ask for

        asked = await chat(
            client,
            "gpt-4o-mini",
            stream=True,
            stream_options={"include_usage": True},
            store=True,
            metadata={"case": "asked"},
        )
        tail = _events(asked.content)[-1]
        assert tail["choices"] == [] and tail["usage"]["total_tokens"] > 0

        for case in ("plain", "asked"):
            await wait_for_count(client, 1, params={"metadata.case": case})
            log = (await client.get("/logs", params={"metadata.case": case})).json()["data"][0]
            assert log["usage"]["prompt_tokens"] > 0 and log["usage"]["completion_tokens"] > 0, log["usage"]
            assert log["usage"]["total_tokens"] == tail["usage"]["total_tokens"]  # the same prompt


async def test_a_write_by_another_process_is_found_by_catching_up_on_a_miss(
    running: RunningPlatform, project: Project
) -> None:
    """Published on catalog.v1 but not applied here (as another api process would): the router's
    miss waits for the catalog reader to reach the topic's end and looks again."""
    state = running.platform.state
    async with state["sessions"].begin() as session:
        row = await providers.update_provider_keys(
            session=session,
            project_id=project.id,
            update=ProviderKeysUpdate(openai=OPENAI_KEY),
            secret_key=state["secret_key"],
        )
        record = providers.provider_keys_record(row)
    await providers.publish(broker=running.platform.broker, records=[record], timeout=10)
    async with project.client() as client:
        answered = await chat(client, "gpt-4o-mini")
    assert answered.status_code == 200, answered.text


async def test_only_a_catalog_miss_waits_for_the_catalog_and_looks_again() -> None:
    synced: list[bool] = []

    class Catalog:
        def resolve(self, project_id: str, model: str) -> str:
            if model == "broken":
                raise APIError(400, "bad model name", code="invalid_model")
            if not synced:
                raise model_not_found(model, "not in the catalog yet")
            return f"route for {model}"

    async def sync() -> bool:
        synced.append(True)
        return True

    chat = object.__new__(ChatService)  # only its resolve() is under test
    chat.router = chat.resolver = Catalog()  # the resolver's attribute name, either spelling
    chat.catalog_sync = None
    with pytest.raises(APIError):
        await chat.resolve("proj", "new-model")  # no catalog to catch up with: the miss stands
    chat.catalog_sync = sync
    assert await chat.resolve("proj", "new-model") == "route for new-model"
    assert synced == [True]
    with pytest.raises(APIError):
        await chat.resolve("proj", "broken")
    assert synced == [True]  # not a catalog miss: no wait


@pytest.mark.parametrize("model", ["anthropic:claude-3-5-sonnet-20241022", "gemini:gemini-1.5-flash"])
async def test_translated_streams_are_logged_with_real_token_counts(project: Project, model: str) -> None:
    keys = {"openai": OPENAI_KEY, "anthropic": ANTHROPIC_KEY, "gemini": GEMINI_KEY}
    async with project.client() as client:
        assert (await client.put("/provider-keys", json=keys)).status_code == 200
        streamed = await chat(client, model, stream=True, store=True, metadata={"case": "translated"})
        assert streamed.status_code == 200, streamed.text
        events = _events(streamed.content)
        assert events and all("usage" not in e and e["choices"] for e in events)
        await wait_for_count(client, 1, params={"metadata.case": "translated"})
        log = (await client.get("/logs", params={"metadata.case": "translated"})).json()["data"][0]
    assert log["usage"]["prompt_tokens"] > 0 and log["usage"]["completion_tokens"] > 0, log["usage"]
