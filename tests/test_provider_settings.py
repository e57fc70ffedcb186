"""Provider settings: provider keys, external providers, deployments.

Over real HTTP against the running platform; secrets are checked to be absent from every
response and from the database, and present (sealed, openable) on ``catalog.v1``. The
migration and service functions also run on both databases (SQLite and Postgres).
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from sqlalchemy import func, select, text

from services.api.projects import service as projects
from services.api.providers import service as providers
from services.api.providers.models import (
    DeploymentSpec,
    ExternalModel,
    ExternalProviderCreate,
    ExternalProviderUpdate,
    ProviderKeysUpdate,
)
from services.common.db import make_engine, make_sessionmaker, migrate
from services.common.errors import APIError
from services.common.events import CATALOG_TOPIC, CatalogRecord
from services.common.secrets import (
    SecretError,
    decrypt_secret,
    encrypt_secret,
    load_or_create_key,
    parse_key,
)
from services.common.settings import Settings
from tests.conftest import Project, RunningPlatform, wait_until
from tests.helpers import assert_error


def plain_key(name: str) -> str:
    """A recognisable, unique fake secret."""
    return f"sk-{name}-{secrets.token_hex(12)}"


class Recorder:
    """Collects every response body so a test can assert a secret never left the server."""

    def __init__(self) -> None:
        self.bodies: list[str] = []

    async def __call__(self, response: httpx.Response) -> None:
        await response.aread()
        self.bodies.append(response.text)

    def assert_absent(self, *values: str) -> None:
        assert self.bodies
        for body in self.bodies:
            for value in values:
                assert value not in body


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


def client(project: Project, recorder: Recorder) -> httpx.AsyncClient:
    return project.client(event_hooks={"response": [recorder]})


async def read_catalog(kafka_url: str, project_id: str) -> list[CatalogRecord]:
    """Every provider-settings record of ``project_id`` on ``catalog.v1``, in offset order."""
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka_url, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        await consumer.topics()
        partitions = [
            TopicPartition(CATALOG_TOPIC, p) for p in consumer.partitions_for_topic(CATALOG_TOPIC) or []
        ]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        records: list[CatalogRecord] = []
        while [tp for tp in partitions if await consumer.position(tp) < ends[tp]]:
            for batch in (await consumer.getmany(timeout_ms=500)).values():
                for message in batch:
                    record = CatalogRecord.model_validate_json(message.value)
                    assert message.key == record.key.encode()
                    mine = record.data.get("project_id") == project_id
                    if mine and record.kind in ("provider_keys", "external_provider", "deployment"):
                        records.append(record)
        return records
    finally:
        await consumer.stop()


def latest(records: list[CatalogRecord]) -> dict[str, CatalogRecord]:
    """What a consumer materializes: the last record per key."""
    return {r.key: r for r in records}


async def wait_for_record(
    running: RunningPlatform, project_id: str, check: Callable[[dict[str, CatalogRecord]], bool]
) -> dict[str, CatalogRecord]:
    state: dict[str, CatalogRecord] = {}

    async def ok() -> bool:
        nonlocal state
        state = latest(await read_catalog(running.settings.kafka_url, project_id))
        return check(state)

    await wait_until(ok, what="records on catalog.v1")
    return state


def database_bytes(running: RunningPlatform) -> bytes:
    path = Path(running.settings.resolved_database_url().split("///", 1)[1])
    return b"".join(p.read_bytes() for p in (path, Path(f"{path}-wal")) if p.exists())


async def stored_secret_columns(running: RunningPlatform) -> list[str]:
    sessions = running.platform.state["sessions"]
    queries = [
        "SELECT openai_key_enc, anthropic_key_enc, gemini_key_enc FROM provider_keys",
        "SELECT api_key_enc, base_url FROM external_providers",
        "SELECT api_key_enc, base_url FROM deployments",
    ]
    values: list[str] = []
    async with sessions() as session:
        for query in queries:
            for row in await session.execute(text(query)):
                values += [v for v in row if v is not None]
    return values


async def assert_not_stored(running: RunningPlatform, *plains: str) -> None:
    columns = await stored_secret_columns(running)
    raw = database_bytes(running)
    for plain in plains:
        assert all(plain not in v for v in columns)
        assert plain.encode() not in raw


# --- secrets.py ------------------------------------------------------------------------------


def test_secret_round_trip_is_randomized() -> None:
    key = os.urandom(32)
    first, second = encrypt_secret("sk-live-ünïcode", key), encrypt_secret("sk-live-ünïcode", key)
    assert first != second and first.startswith("v1.") and second.count(".") == 2
    assert "sk-live" not in first
    assert decrypt_secret(first, key) == decrypt_secret(second, key) == "sk-live-ünïcode"
    assert decrypt_secret(encrypt_secret("", key), key) == ""


def test_tampered_or_wrong_key_fails_without_revealing_the_secret() -> None:
    key, other = os.urandom(32), os.urandom(32)
    plain = plain_key("tamper")
    token = encrypt_secret(plain, key)
    version, nonce, body = token.split(".")
    flipped = body[:-2] + ("A" if body[-2] != "A" else "B") + body[-1]
    for bad in (f"{version}.{nonce}.{flipped}", f"{version}.{nonce[::-1]}.{body}"):
        with pytest.raises(SecretError):
            decrypt_secret(bad, key)
    with pytest.raises(SecretError) as wrong:
        decrypt_secret(token, other)
    assert plain not in str(wrong.value) and "wrong key" in str(wrong.value)
    assert wrong.value.__cause__ is None and wrong.value.__suppress_context__
    for malformed in ("", "v2.a.b", "v1.only-two", "v1.!!!.???", plain):
        with pytest.raises(SecretError) as exc:
            decrypt_secret(malformed, key)
        assert plain not in str(exc.value)
    with pytest.raises(ValueError, match="32 bytes"):
        encrypt_secret("x", b"short")


def test_secret_key_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import base64

    raw = os.urandom(32)
    monkeypatch.setenv("DISTILLERY_SECRET_KEY", base64.b64encode(raw).decode())
    assert load_or_create_key(Settings(data_dir=tmp_path)) == raw
    assert not (tmp_path / "secret.key").exists()
    monkeypatch.setenv("DISTILLERY_SECRET_KEY", base64.urlsafe_b64encode(raw).decode().rstrip("="))
    assert load_or_create_key(Settings(data_dir=tmp_path)) == raw
    for malformed in ("not-base64!!", base64.b64encode(os.urandom(16)).decode(), "c2VjcmV0"):
        monkeypatch.setenv("DISTILLERY_SECRET_KEY", malformed)
        with pytest.raises(ValueError) as exc:
            load_or_create_key(Settings(data_dir=tmp_path))
        message = str(exc.value)
        assert "DISTILLERY_SECRET_KEY" in message and "32" in message and malformed not in message


def test_secret_key_file_is_created_once_with_private_permissions(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "fresh")
    key = load_or_create_key(settings)
    path = tmp_path / "fresh" / "secret.key"
    assert len(key) == 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_key(settings) == key  # reused, not replaced
    assert parse_key(path.read_text(), source="file") == key
    path.write_text("garbage\n")
    with pytest.raises(ValueError, match="secret.key"):
        load_or_create_key(settings)


# --- over HTTP -------------------------------------------------------------------------------


async def test_running_platform_key_file_is_private(running: RunningPlatform) -> None:
    path = running.settings.data_dir / "secret.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert parse_key(path.read_text(), source="file") == running.platform.state["secret_key"]


async def test_provider_keys(running: RunningPlatform, project: Project, recorder: Recorder) -> None:
    openai, anthropic = plain_key("openai"), plain_key("anthropic")
    key = running.platform.state["secret_key"]
    async with client(project, recorder) as c:
        response = await c.get("/provider-keys")
        assert response.status_code == 200, response.text
        assert response.json() == {
            "object": "provider_keys",
            "openai": {"configured": False},
            "anthropic": {"configured": False},
            "gemini": {"configured": False},
        }
        response = await c.put("/provider-keys", json={"openai": openai, "anthropic": f"  {anthropic}\n"})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["openai"] == body["anthropic"] == {"configured": True}
        assert body["gemini"] == {"configured": False}

        state = await wait_for_record(running, project.id, lambda s: f"provider_keys/{project.id}" in s)
        record = state[f"provider_keys/{project.id}"]
        assert record.kind == "provider_keys" and record.id == project.id and not record.deleted
        assert set(record.data) == {"project_id", "openai", "anthropic", "gemini"}
        assert decrypt_secret(record.data["openai"], key) == openai
        assert decrypt_secret(record.data["anthropic"], key) == anthropic  # stripped
        assert record.data["gemini"] is None
        assert openai not in record.model_dump_json()

        # absent = unchanged, null = removed
        response = await c.put("/provider-keys", json={"openai": None})
        assert response.json()["openai"] == {"configured": False}
        assert response.json()["anthropic"] == {"configured": True}
        assert (await c.get("/provider-keys")).json() == response.json()

        def removed(s: dict[str, CatalogRecord]) -> bool:
            return s[f"provider_keys/{project.id}"].data["openai"] is None

        state = await wait_for_record(running, project.id, removed)
        assert decrypt_secret(state[f"provider_keys/{project.id}"].data["anthropic"], key) == anthropic

        assert_error(await c.put("/provider-keys", json={"openai": ""}), 400, "openai")
        assert_error(await c.put("/provider-keys", json={"mistral": "x"}), 400, "mistral")
        assert_error(await c.put("/provider-keys", json={"gemini": 12}), 400, "gemini")
    recorder.assert_absent(openai, anthropic)
    await assert_not_stored(running, openai, anthropic)


def provider_body(slug: str, api_key: str | None = None, **overrides: object) -> dict:
    body: dict = {
        "slug": slug,
        "type": "openai",
        "baseUrl": "https://api.deepseek.example/v1/",
        "models": [
            {"slug": "deepseek-chat", "contextWindow": 64000, "inputPricePerMillion": 0.27},
            {"slug": "deepseek-ai/DeepSeek-V3", "outputPricePerMillion": 1.1},
        ],
    }
    if api_key is not None:
        body["apiKey"] = api_key
    body.update(overrides)
    return body


async def test_external_provider_crud(running: RunningPlatform, project: Project, recorder: Recorder) -> None:
    secret, rotated = plain_key("deepseek"), plain_key("rotated")
    key = running.platform.state["secret_key"]
    async with client(project, recorder) as c:
        response = await c.post("/external-providers", json=provider_body("deepseek", secret))
        assert response.status_code == 201, response.text
        created = response.json()
        provider_id = created["id"]
        assert created["object"] == "external_provider" and created["slug"] == "deepseek"
        assert created["type"] == "openai" and created["baseUrl"] == "https://api.deepseek.example/v1"
        assert created["apiVersion"] is None and created["hasApiKey"] is True
        assert created["models"] == [
            {
                "slug": "deepseek-chat",
                "contextWindow": 64000,
                "inputPricePerMillion": 0.27,
                "outputPricePerMillion": None,
            },
            {
                "slug": "deepseek-ai/DeepSeek-V3",
                "contextWindow": None,
                "inputPricePerMillion": None,
                "outputPricePerMillion": 1.1,
            },
        ]
        assert created["created"] and created["updated"]
        assert not {"apiKey", "api_key", "apiKeyEnc"} & set(created)

        listed = (await c.get("/external-providers")).json()
        assert listed == {"object": "list", "data": [created]}
        assert (await c.get(f"/external-providers/{provider_id}")).json() == created

        state = await wait_for_record(running, project.id, lambda s: f"external_provider/{provider_id}" in s)
        record = state[f"external_provider/{provider_id}"]
        assert record.data == {
            "project_id": project.id,
            "slug": "deepseek",
            "type": "openai",
            "base_url": "https://api.deepseek.example/v1",
            "api_key": record.data["api_key"],
            "api_version": None,
            "models": [
                {
                    "slug": "deepseek-chat",
                    "context_window": 64000,
                    "input_price_per_million": 0.27,
                    "output_price_per_million": None,
                },
                {
                    "slug": "deepseek-ai/DeepSeek-V3",
                    "context_window": None,
                    "input_price_per_million": None,
                    "output_price_per_million": 1.1,
                },
            ],
        }
        assert decrypt_secret(record.data["api_key"], key) == secret

        # PATCH: replace the models (reusing a slug), rotate the key, move the base URL
        patch = {
            "models": [{"slug": "deepseek-chat", "contextWindow": 128000}, {"slug": "deepseek-reasoner"}],
            "apiKey": rotated,
            "baseUrl": "http://10.0.0.5:8000/v1",
        }
        response = await c.patch(f"/external-providers/{provider_id}", json=patch)
        assert response.status_code == 200, response.text
        patched = response.json()
        assert [m["slug"] for m in patched["models"]] == ["deepseek-chat", "deepseek-reasoner"]
        assert patched["models"][0]["contextWindow"] == 128000 and patched["hasApiKey"] is True
        assert patched["baseUrl"] == "http://10.0.0.5:8000/v1" and patched["created"] == created["created"]
        assert (await c.get(f"/external-providers/{provider_id}")).json() == patched

        def rotated_on_topic(s: dict[str, CatalogRecord]) -> bool:
            data = s[f"external_provider/{provider_id}"].data
            return data["base_url"] == "http://10.0.0.5:8000/v1"

        state = await wait_for_record(running, project.id, rotated_on_topic)
        data = state[f"external_provider/{provider_id}"].data
        assert decrypt_secret(data["api_key"], key) == rotated
        assert [m["slug"] for m in data["models"]] == ["deepseek-chat", "deepseek-reasoner"]

        # absent fields stay; apiKey null removes the key
        response = await c.patch(f"/external-providers/{provider_id}", json={"apiKey": None})
        assert response.json()["hasApiKey"] is False and len(response.json()["models"]) == 2
        assert_error(
            await c.patch(f"/external-providers/{provider_id}", json={"baseUrl": None}), 400, "baseUrl"
        )
        assert_error(await c.patch(f"/external-providers/{provider_id}", json={"type": "azure"}), 400, "type")
        assert_error(await c.patch(f"/external-providers/{provider_id}", json={"slug": "x"}), 400, "slug")

        response = await c.delete(f"/external-providers/{provider_id}")
        assert response.status_code == 200, response.text
        assert response.json() == {"id": provider_id, "object": "external_provider", "deleted": True}
        assert_error(await c.get(f"/external-providers/{provider_id}"), 404, provider_id)
        assert_error(await c.delete(f"/external-providers/{provider_id}"), 404)
        assert (await c.get("/external-providers")).json() == {"object": "list", "data": []}

        state = await wait_for_record(
            running, project.id, lambda s: s[f"external_provider/{provider_id}"].deleted
        )
        assert state[f"external_provider/{provider_id}"].data == {
            "project_id": project.id,
            "slug": "deepseek",
        }
        async with running.platform.state["sessions"]() as session:
            assert (
                await session.scalar(
                    select(func.count())
                    .select_from(ExternalModel)
                    .where(ExternalModel.provider_id == provider_id)
                )
                == 0
            )

        # the slug is free again
        assert (await c.post("/external-providers", json=provider_body("deepseek"))).status_code == 201
    recorder.assert_absent(secret, rotated)
    await assert_not_stored(running, secret, rotated)


async def test_azure_needs_an_api_version(running: RunningPlatform, project: Project) -> None:
    async with project.client() as c:
        body = provider_body(
            "azure-east", plain_key("azure"), type="azure", baseUrl="https://x.openai.azure.com"
        )
        body_error = assert_error(await c.post("/external-providers", json=body), 400, "apiVersion")
        assert body_error["error"]["param"] == "apiVersion"
        response = await c.post("/external-providers", json={**body, "apiVersion": "2024-06-01"})
        assert response.status_code == 201, response.text
        provider = response.json()
        assert provider["type"] == "azure" and provider["apiVersion"] == "2024-06-01"
        patch = await c.patch(f"/external-providers/{provider['id']}", json={"apiVersion": None})
        assert_error(patch, 400, "apiVersion")
        unchanged = (await c.get(f"/external-providers/{provider['id']}")).json()
        assert unchanged["apiVersion"] == "2024-06-01"  # nothing half-written
        response = await c.patch(f"/external-providers/{provider['id']}", json={"apiVersion": "2025-01-01"})
        assert response.json()["apiVersion"] == "2025-01-01"


async def test_duplicate_slug_is_a_conflict(project: Project, make_project) -> None:
    async with project.client() as c:
        assert (await c.post("/external-providers", json=provider_body("dup"))).status_code == 201
        body = assert_error(await c.post("/external-providers", json=provider_body("dup")), 409, "dup")
        assert body["error"]["param"] == "slug" and body["error"]["code"] == "conflict"
        assert len((await c.get("/external-providers")).json()["data"]) == 1
    other = await make_project()
    async with other.client() as c:  # slugs are per project
        assert (await c.post("/external-providers", json=provider_body("dup"))).status_code == 201


async def test_another_projects_provider_is_not_found(
    running: RunningPlatform, project: Project, make_project
) -> None:
    other = await make_project()
    async with other.client() as c:
        foreign = (await c.post("/external-providers", json=provider_body("theirs"))).json()
        await c.put("/deployments/their-model", json={"baseUrl": "http://vllm:8000/v1", "model": "x"})
    async with project.client() as c:
        for response in (
            await c.get(f"/external-providers/{foreign['id']}"),
            await c.patch(f"/external-providers/{foreign['id']}", json={"baseUrl": "http://evil.example"}),
            await c.delete(f"/external-providers/{foreign['id']}"),
            await c.get("/deployments/their-model"),
            await c.delete("/deployments/their-model"),
        ):
            assert_error(response, 404)
        assert (await c.get("/external-providers")).json()["data"] == []
        assert (await c.get("/deployments")).json()["data"] == []
        # putting the same slug in my project makes my own deployment, not theirs
        assert (
            await c.put("/deployments/their-model", json={"baseUrl": "http://a/v1", "model": "y"})
        ).status_code == 201
    async with other.client() as c:
        assert (await c.get(f"/external-providers/{foreign['id']}")).json() == foreign
        assert (await c.get("/deployments/their-model")).json()["model"] == "x"


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"slug": "Bad Slug!"}, "slug"),
        ({"slug": ""}, "slug"),
        ({"slug": "under_score"}, "slug"),
        ({"type": "bedrock"}, "type"),
        ({"baseUrl": "ftp://files.example.com"}, "baseUrl"),
        ({"baseUrl": "not a url"}, "baseUrl"),
        ({"baseUrl": "https://"}, "baseUrl"),
        ({"baseUrl": "https://api.example.com:99999/v1"}, "baseUrl"),
        ({"baseUrl": "https://api.example.com/v1?key=1"}, "baseUrl"),
        ({"models": [{"slug": "a"}, {"slug": "a"}]}, "models"),
        ({"models": [{"slug": "has space"}]}, "models.0.slug"),
        ({"models": [{"slug": "m", "inputPricePerMillion": -1}]}, "models.0.inputPricePerMillion"),
        ({"models": [{"slug": "m", "contextWindow": 0}]}, "models.0.contextWindow"),
        ({"colour": "red"}, "colour"),
    ],
)
async def test_invalid_provider_is_a_400_naming_the_field(project: Project, patch: dict, param: str) -> None:
    async with project.client() as c:
        body = assert_error(
            await c.post("/external-providers", json={**provider_body("ok"), **patch}), 400, param
        )
        assert body["error"]["param"] == param
        assert (await c.get("/external-providers")).json()["data"] == []


async def test_credentials_in_a_base_url_are_refused_and_not_echoed(project: Project) -> None:
    password = plain_key("pw")
    async with project.client() as c:
        body = {**provider_body("creds"), "baseUrl": f"https://user:{password}@api.example.com/v1"}
        response = await c.post("/external-providers", json=body)
        assert_error(response, 400, "baseUrl", "credentials")
        assert password not in response.text
        deployment = {"baseUrl": f"https://user:{password}@vllm/v1", "model": "m"}
        response = await c.put("/deployments/creds", json=deployment)
        assert_error(response, 400, "baseUrl")
        assert password not in response.text


async def test_deployments(running: RunningPlatform, project: Project, recorder: Recorder) -> None:
    secret = plain_key("vllm")
    key = running.platform.state["secret_key"]
    slug = "support-bot-v2"
    record_key = f"deployment/{project.id}/{slug}"
    spec = {
        "baseUrl": "http://vllm.internal:8000/v1",
        "model": "support-bot-v2-lora",
        "apiKey": secret,
        "pruningRules": ["You are a helpful support bot.", "Always answer in JSON."],
        "defaultTemperature": 0.2,
        "inputPricePerMillion": 0.1,
        "outputPricePerMillion": 0.4,
    }
    async with client(project, recorder) as c:
        response = await c.put(f"/deployments/{slug}", json=spec)
        assert response.status_code == 201, response.text
        created = response.json()
        assert created == {
            "object": "deployment",
            "id": slug,
            "slug": slug,
            "baseUrl": "http://vllm.internal:8000/v1",
            "model": "support-bot-v2-lora",
            "hasApiKey": True,
            "pruningRules": ["You are a helpful support bot.", "Always answer in JSON."],
            "defaultTemperature": 0.2,
            "inputPricePerMillion": 0.1,
            "outputPricePerMillion": 0.4,
            "created": created["created"],
            "updated": created["updated"],
        }
        assert (await c.get(f"/deployments/{slug}")).json() == created
        assert (await c.get("/deployments")).json() == {"object": "list", "data": [created]}

        state = await wait_for_record(running, project.id, lambda s: record_key in s)
        record = state[record_key]
        assert record.kind == "deployment" and record.id == f"{project.id}/{slug}"
        assert record.data == {
            "project_id": project.id,
            "slug": slug,
            "base_url": "http://vllm.internal:8000/v1",
            "upstream_model": "support-bot-v2-lora",
            "api_key": record.data["api_key"],
            "pruning_rules": ["You are a helpful support bot.", "Always answer in JSON."],
            "default_temperature": 0.2,
            "input_price_per_million": 0.1,
            "output_price_per_million": 0.4,
        }
        assert decrypt_secret(record.data["api_key"], key) == secret

        # replace: absent apiKey keeps the key, other absent fields reset
        response = await c.put(
            f"/deployments/{slug}", json={"baseUrl": "http://vllm2:8000/v1", "model": "v3"}
        )
        assert response.status_code == 200, response.text
        replaced = response.json()
        assert replaced["hasApiKey"] is True and replaced["pruningRules"] == []
        assert replaced["defaultTemperature"] is None and replaced["created"] == created["created"]
        state = await wait_for_record(
            running, project.id, lambda s: s[record_key].data["upstream_model"] == "v3"
        )
        assert decrypt_secret(state[record_key].data["api_key"], key) == secret

        response = await c.put(
            f"/deployments/{slug}", json={"baseUrl": "http://vllm2:8000/v1", "model": "v3", "apiKey": None}
        )
        assert response.json()["hasApiKey"] is False

        for bad, param in (
            ({**spec, "defaultTemperature": 3}, "defaultTemperature"),
            ({**spec, "pruningRules": ["ok", ""]}, "pruningRules.1"),
            ({**spec, "pruningRules": "not a list"}, "pruningRules"),
            ({k: v for k, v in spec.items() if k != "model"}, "model"),
            ({**spec, "baseUrl": "vllm:8000"}, "baseUrl"),
            ({**spec, "slug": slug}, "slug"),
        ):
            assert_error(await c.put(f"/deployments/{slug}", json=bad), 400, param)
        assert_error(await c.put("/deployments/Not_A_Slug", json=spec), 400, "slug")
        assert_error(await c.get("/deployments/missing"), 404, "missing")

        response = await c.delete(f"/deployments/{slug}")
        assert response.json() == {"id": slug, "object": "deployment", "deleted": True}
        assert_error(await c.get(f"/deployments/{slug}"), 404)
        assert_error(await c.delete(f"/deployments/{slug}"), 404)
        state = await wait_for_record(running, project.id, lambda s: s[record_key].deleted)
        assert state[record_key].data == {"project_id": project.id, "slug": slug}
    recorder.assert_absent(secret)
    await assert_not_stored(running, secret)


async def test_unauthenticated_requests_are_refused(project: Project) -> None:
    async with httpx.AsyncClient(base_url=project.base_url) as anonymous:
        assert_error(await anonymous.get("/provider-keys"), 401)
        assert_error(await anonymous.post("/external-providers", json=provider_body("x")), 401)
        assert_error(await anonymous.put("/deployments/x", json={"baseUrl": "http://a", "model": "m"}), 401)


async def test_broker_failure_rolls_the_change_back(
    running: RunningPlatform, project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A change the router could never learn about is not saved: 503, and the database is unchanged."""
    broker = running.platform.broker

    async def unavailable(*args: object, **kwargs: object) -> None:
        raise ConnectionError("broker down")

    async with project.client() as c:
        provider = (await c.post("/external-providers", json=provider_body("steady"))).json()
        monkeypatch.setattr(broker, "publish", unavailable)
        attempts = [
            await c.put("/provider-keys", json={"openai": plain_key("lost")}),
            await c.post("/external-providers", json=provider_body("lost")),
            await c.patch(f"/external-providers/{provider['id']}", json={"models": []}),
            await c.delete(f"/external-providers/{provider['id']}"),
            await c.put("/deployments/lost", json={"baseUrl": "http://vllm/v1", "model": "m"}),
        ]
        monkeypatch.undo()
        for response in attempts:
            assert_error(response, 503, "broker")
        assert (await c.get("/provider-keys")).json()["openai"] == {"configured": False}
        assert (await c.get("/external-providers")).json()["data"] == [provider]
        assert (await c.get("/deployments")).json()["data"] == []


async def test_start_republishes_everything(running: RunningPlatform, project: Project) -> None:
    """Tansu forgets the topic on restart: the api's start hook publishes the whole catalog again."""
    secret = plain_key("republish")
    async with project.client() as c:
        provider = (await c.post("/external-providers", json=provider_body("again", secret))).json()
        await c.put("/deployments/again", json={"baseUrl": "http://vllm/v1", "model": "m", "apiKey": secret})
        await c.put("/provider-keys", json={"gemini": secret})
    keys = {
        f"external_provider/{provider['id']}",
        f"deployment/{project.id}/again",
        f"provider_keys/{project.id}",
    }
    before = await wait_for_record(running, project.id, lambda s: keys <= set(s))
    counts = len(await read_catalog(running.settings.kafka_url, project.id))

    hook = next(h for h in running.platform.on_started if h.__name__ == "publish_provider_settings")
    await hook()

    async def republished() -> bool:
        return len(await read_catalog(running.settings.kafka_url, project.id)) >= counts + 3

    await wait_until(republished, what="republished records")
    after = latest(await read_catalog(running.settings.kafka_url, project.id))
    assert {k: after[k] for k in keys} == {k: before[k] for k in keys}


# --- both databases --------------------------------------------------------------------------


async def test_provider_settings_service_on_both_databases(database_url: str) -> None:
    await migrate(database_url)
    await migrate(database_url)  # idempotent
    engine = make_engine(database_url)
    sessions = make_sessionmaker(engine)
    key = os.urandom(32)
    secret = plain_key("db")
    try:
        async with sessions.begin() as session:
            project = await projects.create_project(session=session, name="team")
            keys = await providers.update_provider_keys(
                session=session,
                project_id=project.id,
                update=ProviderKeysUpdate(openai=secret),
                secret_key=key,
            )
            provider = await providers.create_provider(
                session=session,
                project_id=project.id,
                spec=ExternalProviderCreate.model_validate(provider_body("p", secret)),
                secret_key=key,
            )
            deployment, created = await providers.put_deployment(
                session=session,
                project_id=project.id,
                slug="ft",
                spec=DeploymentSpec(
                    baseUrl="http://vllm/v1", model="m", apiKey=secret, pruningRules=["b", "a"]
                ),
                secret_key=key,
            )
        assert created and decrypt_secret(keys.openai_key_enc, key) == secret
        async with sessions.begin() as session:  # replacing models may reuse their slugs
            update = ExternalProviderUpdate(models=[{"slug": "deepseek-chat"}, {"slug": "new"}])
            provider = await providers.update_provider(
                session=session, project_id=project.id, provider_id=provider.id, update=update, secret_key=key
            )
        assert [m.slug for m in provider.models] == ["deepseek-chat", "new"]
        with pytest.raises(APIError) as exc:
            async with sessions.begin() as session:
                await providers.create_provider(
                    session=session,
                    project_id=project.id,
                    spec=ExternalProviderCreate.model_validate(provider_body("p")),
                    secret_key=key,
                )
        assert exc.value.status_code == 409
        async with sessions() as session:
            records = {r.key: r for r in await providers.catalog_records(session=session)}
            reloaded = await providers.get_deployment(session=session, project_id=project.id, slug="ft")
            assert reloaded.pruning_rules == ["b", "a"]
            assert providers.deployment_out(reloaded).created.endswith("+00:00")
        assert set(records) == {
            f"provider_keys/{project.id}",
            f"external_provider/{provider.id}",
            f"deployment/{project.id}/ft",
        }
        assert providers.count_unreadable(records.values(), key) == 0
        assert providers.count_unreadable(records.values(), os.urandom(32)) == 3
        async with sessions.begin() as session:
            tombstone = await providers.delete_provider(
                session=session, project_id=project.id, provider_id=provider.id
            )
        assert tombstone.deleted and tombstone.key == f"external_provider/{provider.id}"
        async with sessions() as session:
            assert await session.scalar(select(func.count()).select_from(ExternalModel)) == 0
            for table in ("provider_keys", "external_providers", "deployments"):
                for row in await session.execute(text(f"SELECT * FROM {table}")):
                    assert all(secret not in str(v) for v in row)
    finally:
        await engine.dispose()
