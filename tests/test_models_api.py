"""The models API (``/models``, ``/unstable/finetune/*``) through the official SDKs, on the real platform.

Training itself is the trainer's: here the api's half — validation, the snapshot and the
TrainingRequest on ``training.requests.v1``, the Model's shape and statuses driven by
``training.events.v1`` events published on the real broker, and the ``catalog.v1`` record.
"""

from __future__ import annotations

import asyncio
import time

import openai
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from openpipe.api_client.core.api_error import ApiError
from openpipe.api_client.types import (
    CreateModelRequestTrainingConfig_Openpipe,
    CreateModelRequestTrainingConfigOpenpipeSftHyperparameters,
)
from openpipe.client import OpenPipe

from services.api import models as catalog_models  # noqa: F401  (every table on Base.metadata)
from services.api.datasets.service import fine_tune_counts
from services.api.fine_tuning import service
from services.api.projects import service as projects
from services.common.db import Base, make_engine, make_sessionmaker, migrate
from services.common.events import CATALOG_TOPIC, TRAINING_REQUESTS_TOPIC, TrainingEvent, dlq_topic
from tests.conftest import Project, RunningPlatform, wait_until
from tests.helpers_fine_tuning import (
    ABSENT_BASE,
    TINY,
    Events,
    make_dataset,
    make_run,
    read_topic,
    rows,
    wait_for_job,
)


def openpipe_sdk(project: Project) -> OpenPipe:
    return OpenPipe(api_key=project.key, base_url=project.base_url)


async def test_create_model_with_the_openpipe_sdk(running: RunningPlatform, project: Project) -> None:
    dataset_id = await make_dataset(project, rows(6, rejected=True))
    async with project.client() as http:
        rule = (
            await http.post(f"/datasets/{dataset_id}/pruning-rules", json={"text": "STATIC PREAMBLE. "})
        ).json()
    op = openpipe_sdk(project)
    created = await asyncio.to_thread(
        op.create_model,
        dataset_id=dataset_id,
        slug="support-bot",
        pruning_rule_ids=[rule["id"]],
        default_temperature=0.3,
        training_config={
            "provider": "openpipe",
            "baseModel": ABSENT_BASE,
            "enable_sft": True,
            "enable_preference_tuning": True,
            "sft_hyperparameters": {"batch_size": "auto", "num_epochs": 2, "learning_rate_multiplier": 0.5},
            "preference_hyperparameters": {"variant": "DPO", "training_beta": 0.2, "adapter_weight": 0.7},
        },
    )
    assert created.id == "support-bot" and created.object == "model"
    assert created.openpipe.status.value == "PENDING" and created.openpipe.dataset_id == dataset_id
    assert created.openpipe.base_model == ABSENT_BASE
    assert created.openpipe.hyperparameters == {
        "is_sft_enabled": True,
        "batch_size": "auto",
        "learning_rate_multiplier": 0.5,
        "num_epochs": 2,
        "is_preference_tuning_enabled": True,
        "preference_tuning_variant": "DPO",
        "preference_tuning_training_beta": 0.2,
        "preference_tuning_adapter_weight": 0.7,
    }
    assert created.pricing.chat_in == 0.30 and created.context_window > 0
    async with project.client() as http:
        raw = (await http.get("/models/support-bot")).json()
    job_id = raw["openpipe"]["jobId"]

    # The request reached the broker (acknowledged before the 2xx), with everything the trainer needs.
    [request] = await read_topic(running, TRAINING_REQUESTS_TOPIC, lambda v: v["job_id"] == job_id)
    assert request["action"] == "start" and request["model_slug"] == "support-bot"
    assert request["base_model"] == ABSENT_BASE and request["pruning_rules"] == ["STATIC PREAMBLE. "]
    hyper = request["hyperparameters"]
    assert hyper["enable_sft"] and hyper["enable_preference_tuning"] and hyper["num_epochs"] == 2
    assert hyper["training_beta"] == 0.2 and hyper["adapter_weight"] == 0.7 and hyper["batch_size"] == "auto"
    snapshot = await running.platform.blobs.get_bytes(request["snapshot_uri"])
    assert snapshot.count(b"\n") == 6 and b"STATIC PREAMBLE" not in snapshot  # the chosen rule applied
    assert request["output_prefix"].startswith(f"fine_tunes/{project.id}/support-bot/")

    # Later rule edits do not change the model.
    async with project.client() as http:
        await http.delete(f"/pruning-rules/{rule['id']}")
        dataset = (await http.get(f"/datasets/{dataset_id}")).json()
    assert dataset["fine_tune_count"] == 1
    listed = await asyncio.to_thread(op.list_models)
    assert [m.id for m in listed.data] == ["support-bot"]
    assert listed.data[0].openpipe.dataset_id == dataset_id

    # The openai SDK lists and retrieves the same models.
    client = openai.AsyncOpenAI(api_key=project.key, base_url=project.base_url, max_retries=0)
    assert [m.id for m in (await client.models.list()).data] == ["support-bot"]
    assert (await client.models.retrieve("support-bot")).owned_by == project.id

    deleted = await asyncio.to_thread(op.delete_model, model_slug="support-bot")
    assert deleted.deleted is True and deleted.id == "support-bot"
    with pytest.raises(ApiError) as missing:
        await asyncio.to_thread(op.get_model, model_slug="support-bot")
    assert missing.value.status_code == 404
    # The run in flight was cancelled with the model.
    [cancel] = await read_topic(
        running, TRAINING_REQUESTS_TOPIC, lambda v: v["job_id"] == job_id and v["action"] == "cancel"
    )
    assert cancel["request_id"] == f"{job_id}:2"


async def test_deprecated_flat_hyperparameters_and_unstable_routes(
    running: RunningPlatform, project: Project
) -> None:
    dataset_id = await make_dataset(project, rows(4))
    # A base that ops put in the model store (models/<name>/) is accepted by name.
    await running.platform.blobs.put_bytes("models/acme/custom-7b/config.json", b"{}")
    async with project.client() as http:
        stored = await http.post(
            "/models",
            json={
                "datasetId": dataset_id,
                "slug": "custom",
                "trainingConfig": {"baseModel": "acme/custom-7b"},
            },
        )
        assert stored.status_code == 200, stored.text
        assert stored.json()["pricing"] == {"chatIn": 0.3, "chatOut": 0.45}  # 7B: the "8B and smaller" tier
    async with project.client() as http:
        created = await http.post(
            "/models",
            json={
                "datasetId": dataset_id,
                "slug": "flat",
                "trainingConfig": {
                    "provider": "openpipe",
                    "baseModel": ABSENT_BASE,
                    "hyperparameters": {
                        "is_sft_enabled": True,
                        "num_epochs": 3,
                        "learning_rate_multiplier": 2,
                    },
                },
            },
        )
        assert created.status_code == 200, created.text
        assert created.json()["openpipe"]["hyperparameters"] == {
            "is_sft_enabled": True,
            "batch_size": "auto",
            "learning_rate_multiplier": 2.0,
            "num_epochs": 3,
            "is_preference_tuning_enabled": False,
        }
        unstable = await http.post(
            "/unstable/finetune/create",
            json={
                "datasetId": dataset_id,
                "slug": "old-style",
                "baseModel": ABSENT_BASE,
                "overrides": {"num_epochs": 1},
            },
        )
        assert unstable.status_code == 200, unstable.text
        got = (await http.get("/unstable/finetune/get", params={"slug": "old-style"})).json()
        assert (
            got["slug"] == "old-style" and got["datasetId"] == dataset_id and got["baseModel"] == ABSENT_BASE
        )
        assert got["status"] in ("PENDING", "QUEUED", "TRAINING", "ERROR") and "createdAt" in got
        assert (await http.post("/unstable/finetune/delete", json={"slug": "old-style"})).json() == {
            "deleted": "true"
        }
        assert (await http.get("/unstable/finetune/get", params={"slug": "old-style"})).status_code == 404
        dataset = (await http.get(f"/datasets/{dataset_id}")).json()
    assert dataset["fine_tune_count"] == 2


INVALID_CONFIGS = (
    (
        {"baseModel": TINY, "preference_hyperparameters": {"training_beta": 0.1}},
        400,
        "trainingConfig.preference_hyperparameters",
        "enable_preference_tuning",
    ),
    (
        {"provider": "gemini", "baseModel": "models/gemini-1.5-flash-001-tuning"},
        400,
        "trainingConfig.provider",
        "not supported",
    ),
    ({"provider": "openpipeReward", "baseModel": TINY}, 400, "trainingConfig.provider", "not supported"),
    ({"provider": "azure", "baseModel": TINY}, 400, "trainingConfig.provider", "'openpipe' or 'openai'"),
    ({"baseModel": "no/such-model"}, 400, "trainingConfig.baseModel", "Unknown base model"),
    (
        {"baseModel": TINY, "sft_hyperparameters": {"num_epochs": "many"}},
        400,
        "trainingConfig.sft_hyperparameters.num_epochs",
        "num_epochs",
    ),
    (
        {"baseModel": TINY, "sft_hyperparameters": {"batch_size": 0}},
        400,
        "trainingConfig.sft_hyperparameters.batch_size",
        "batch_size",
    ),
    (
        {"baseModel": TINY, "sft_hyperparameters": {"epochs": 2}},
        400,
        "trainingConfig.sft_hyperparameters.epochs",
        "Extra inputs",
    ),
    ({"baseModel": TINY, "enable_sft": False}, 400, "trainingConfig.enable_sft", "Nothing to train"),
    (
        {"baseModel": TINY, "enable_preference_tuning": True},
        400,
        "trainingConfig.enable_preference_tuning",
        "rejected_message",
    ),
    ({"provider": "openai", "baseModel": TINY}, 400, "trainingConfig.baseModel", "OpenAI"),
    (
        {"provider": "openai", "baseModel": "gpt-4o-mini-2024-07-18"},
        400,
        "trainingConfig.provider",
        "OpenAI key",
    ),
)


async def test_invalid_training_configs_are_400s_naming_the_field(project: Project) -> None:
    dataset_id = await make_dataset(project, rows(3))
    async with project.client() as http:
        for config, status, param, words in INVALID_CONFIGS:
            response = await http.post(
                "/models",
                json={
                    "datasetId": dataset_id,
                    "slug": "bad",
                    "trainingConfig": {"provider": "openpipe", **config},
                },
            )
            assert response.status_code == status, (config, response.text)
            body = response.json()
            assert body["error"]["param"] == param and words in body["message"], (config, body)
        assert (await http.get("/models")).json()["data"] == []  # nothing half-written


async def test_unknown_and_foreign_ids_and_slug_conflicts(make_project) -> None:  # type: ignore[no-untyped-def]
    mine, other = await make_project(), await make_project()
    theirs = await make_dataset(other, rows(3))
    empty = await make_dataset(mine, [])
    ours = await make_dataset(mine, rows(3))
    config = {"provider": "openpipe", "baseModel": ABSENT_BASE}
    async with mine.client() as http:
        for dataset_id, code in ((theirs, 404), ("ds_missing", 404), (empty, 400)):
            response = await http.post(
                "/models", json={"datasetId": dataset_id, "slug": "x", "trainingConfig": config}
            )
            assert response.status_code == code, response.text
            assert response.json()["error"]["param"] in ("dataset_id", "datasetId")
        bad_rule = await http.post(
            "/models",
            json={"datasetId": ours, "slug": "x", "pruningRuleIds": ["pr_nope"], "trainingConfig": config},
        )
        assert bad_rule.status_code == 400 and bad_rule.json()["error"]["param"] == "pruningRuleIds"
        malformed = await http.post(
            "/models", content=b"{not json", headers={"Content-Type": "application/json"}
        )
        assert malformed.status_code == 400
        missing = await http.post("/models", json={"slug": "x", "trainingConfig": config})
        assert missing.status_code == 400 and missing.json()["error"]["param"] == "datasetId"
        bad_slug = await http.post(
            "/models", json={"datasetId": ours, "slug": "no spaces", "trainingConfig": config}
        )
        assert bad_slug.status_code == 400 and bad_slug.json()["error"]["param"] == "slug"
        first, second = await asyncio.gather(
            *(
                http.post("/models", json={"datasetId": ours, "slug": "twice", "trainingConfig": config})
                for _ in range(2)
            )
        )
        assert sorted([first.status_code, second.status_code]) == [200, 409], (first.text, second.text)
        assert len((await http.get("/models")).json()["data"]) == 1
        # Another project's model is not found, in every route.
    async with other.client() as http:
        assert (await http.get("/models/twice")).status_code == 404
        assert (await http.delete("/models/twice")).status_code == 404
        assert (await http.get("/models")).json()["data"] == []
        # A model trained earlier as base: unknown slug here; an untrained one is refused.
    async with mine.client() as http:
        untrained = await http.post(
            "/models",
            json={"datasetId": ours, "slug": "child", "trainingConfig": {**config, "baseModel": "twice"}},
        )
        assert untrained.status_code == 400 and "only a trained" in untrained.json()["message"]


async def test_statuses_follow_training_events_once(running: RunningPlatform, project: Project) -> None:
    slug, job_id = await make_run(running, project)
    events = Events(running, project, job_id)
    op = openpipe_sdk(project)

    async def status() -> str:
        return (await asyncio.to_thread(op.get_model, model_slug=slug)).openpipe.status.value

    assert await status() == "PENDING"
    await events.send("status", status="queued")
    await wait_until(lambda: _is(status, "QUEUED"), what="QUEUED")
    await events.send("status", status="running", message="Training started.")
    await wait_until(lambda: _is(status, "TRAINING"), what="TRAINING")
    metrics = {
        "step": 5,
        "total_steps": 10,
        "train_loss": 1.25,
        "train_mean_token_accuracy": 0.5,
        "tokens_per_second": 900.0,
    }
    sent = await events.send("metrics", data=metrics)
    await events.send("metrics", seq=sent.seq, data={**metrics, "train_loss": 99.0})  # a redelivery: ignored
    await events.send(
        "checkpoint", data={"step": 5, "train_loss": 1.25}, artifact_uri=f"fine_tunes/x/{slug}/ckpt-5/"
    )
    await events.send(
        "status",
        status="succeeded",
        artifact_uri=f"fine_tunes/{project.id}/{slug}/{job_id}/adapter/",
        trained_tokens=2_000_000,
    )
    # Trained: PROVISIONING until serving has the adapter answering; there is no adapter at that
    # key here, so the Deployer (services/api/deployments) sets ERROR with the reason.
    await wait_until(lambda: _is(status, "ERROR"), timeout=120, what="deployment refused")
    job = await wait_for_job(project, job_id, lambda j: j["status"] == "succeeded", "job succeeded")
    assert job["fine_tuned_model"] == slug and job["trained_tokens"] == 2_000_000
    assert job["cost_usd"] == pytest.approx(0.96)  # 2M tokens at $0.48/1M (8B and smaller)
    async with project.client() as http:
        listed = (await http.get(f"/fine_tuning/jobs/{job_id}/events", params={"limit": 100})).json()["data"]
        model = (await http.get(f"/models/{slug}")).json()
    metric_events = [e for e in listed if e["type"] == "metrics"]
    assert len(metric_events) == 1 and metric_events[0]["data"]["train_loss"] == 1.25
    assert "Step 5/10" in metric_events[0]["message"]
    assert model["openpipe"]["trainedTokens"] == 2_000_000 and model["openpipe"][
        "trainingCostUsd"
    ] == pytest.approx(0.96)

    # Late or replayed news does not move a finished job.
    await events.send("status", seq=2, status="running")
    await events.send("status", status="failed", message="too late")
    [record] = await read_topic(
        running,
        CATALOG_TOPIC,
        lambda v: (
            v["kind"] == "model"
            and v["id"] == f"{project.id}/{slug}"
            and v["data"]["status"] == "PROVISIONING"
        ),
    )
    assert record["data"]["adapter_uri"] == f"fine_tunes/{project.id}/{slug}/{job_id}/adapter/"
    assert record["data"]["base_model"] == TINY and record["data"]["provider"] == "openpipe"
    await asyncio.sleep(1)
    assert await status() == "ERROR"
    failed = (await asyncio.to_thread(op.get_model, model_slug=slug)).openpipe
    assert "Deployment failed" in failed.error_message and "adapter" in failed.error_message


async def test_failure_event_sets_error_and_poison_goes_to_dlq(
    running: RunningPlatform, project: Project
) -> None:
    slug, job_id = await make_run(running, project)
    events = Events(running, project, job_id)
    await events.send(
        "status",
        status="failed",
        level="error",
        message="Base model weights are absent.",
        error_code="base_model_missing",
    )
    job = await wait_for_job(project, job_id, lambda j: j["status"] == "failed", "job failed")
    assert job["error"] == {
        "code": "base_model_missing",
        "message": "Base model weights are absent.",
        "param": None,
    }
    async with project.client() as http:
        model = (await http.get(f"/models/{slug}")).json()
    assert (
        model["openpipe"]["status"] == "ERROR"
        and model["openpipe"]["errorMessage"] == "Base model weights are absent."
    )

    broker = running.platform.broker
    await broker.publish(b"{not json", "training.events.v1", key=b"poison-1")
    await Events(running, project, "ftjob-does-not-exist").send("status", status="running")
    letters = await read_topic(
        running,
        dlq_topic("training.events.v1"),
        lambda v: v["key"] in ("poison-1", "ftjob-does-not-exist"),
    )
    reasons = {letter["key"]: letter["reason"] for letter in letters}
    assert (
        "invalid TrainingEvent" in reasons["poison-1"]
        and "no training job" in reasons["ftjob-does-not-exist"]
    )


async def _is(get, expected: str) -> bool:  # type: ignore[no-untyped-def]
    return await get() == expected


# --- both databases ------------------------------------------------------------------------------

FINE_TUNING_TABLES = (
    "fine_tuned_models",
    "training_jobs",
    "training_job_events",
    "training_job_checkpoints",
    "training_files",
)


async def test_migration_matches_the_tables_and_events_apply_on_both_databases(database_url: str) -> None:
    await migrate(database_url)
    engine = make_engine(database_url)
    sessions = make_sessionmaker(engine)
    try:
        async with engine.connect() as connection:

            def diff(sync_connection) -> list:  # type: ignore[no-untyped-def]
                return compare_metadata(MigrationContext.configure(sync_connection), Base.metadata)

            changes = await connection.run_sync(diff)
        assert [c for c in changes if any(t in repr(c) for t in FINE_TUNING_TABLES)] == []
        async with sessions.begin() as session:
            project = await projects.create_project(session=session, name="ft")
            plan = await service.plan_for_job(
                session=session, project_id=project.id, body=service.JobCreate(model=TINY, training_file="f")
            )
            start = service.Start(project.id, "db-run", "f", plan, "f", "snapshots/f.jsonl")
            _, job = await service.start_training(session=session, broker=None, start=start)
        succeeded = TrainingEvent(
            event_id="e1",
            job_id=job.id,
            project_id=project.id,
            seq=time.time_ns() // 1000,
            created_at=1,
            type="status",
            status="succeeded",
            artifact_uri="fine_tunes/a/",
            trained_tokens=10,
        )
        for expected in ("PROVISIONING", None):  # the second delivery is a no-op
            async with sessions.begin() as session:
                records = await service.apply_event(session=session, event=succeeded)
            assert (records[0].data["status"] if records else None) == expected
        async with sessions() as session:
            model = await service.get_model(session=session, project_id=project.id, slug="db-run")
            counts = await fine_tune_counts(session=session, dataset_ids=["f"])
        # DEPLOYED comes from the Deployer once the adapter answers a probe (tests/test_serving_router.py).
        assert model.status == "PROVISIONING" and model.adapter_uri == "fine_tunes/a/" and counts == {"f": 1}
    finally:
        await engine.dispose()


# --- end to end with the trainer -----------------------------------------------------------------


@pytest.mark.slow
async def test_end_to_end_dataset_to_deployed_model_on_tiny_chat(
    running: RunningPlatform, project: Project
) -> None:
    dataset_id = await make_dataset(project, rows(8))
    op = openpipe_sdk(project)
    await asyncio.to_thread(
        op.create_model,
        dataset_id=dataset_id,
        slug="tiny-e2e",
        training_config=CreateModelRequestTrainingConfig_Openpipe(  # the SDK's own types
            provider="openpipe",
            base_model=TINY,
            sft_hyperparameters=CreateModelRequestTrainingConfigOpenpipeSftHyperparameters(num_epochs=1),
        ),
    )
    async with project.client() as http:
        job_id = (await http.get("/models/tiny-e2e")).json()["openpipe"]["jobId"]
    seen: set[str] = set()

    async def deployed() -> bool:
        status = (await asyncio.to_thread(op.get_model, model_slug="tiny-e2e")).openpipe.status.value
        seen.add(status)
        assert status != "ERROR", (await asyncio.to_thread(op.get_model, model_slug="tiny-e2e")).openpipe
        return status == "DEPLOYED"

    await wait_until(deployed, timeout=240, what="tiny-e2e DEPLOYED")
    assert "TRAINING" in seen or "QUEUED" in seen
    async with project.client() as http:
        model = (await http.get("/models/tiny-e2e")).json()
        job = (await http.get(f"/fine_tuning/jobs/{job_id}")).json()
        events = (await http.get(f"/fine_tuning/jobs/{job_id}/events", params={"limit": 1000})).json()["data"]
    assert (
        job["status"] == "succeeded" and job["fine_tuned_model"] == "tiny-e2e" and job["trained_tokens"] > 0
    )
    assert job["cost_usd"] > 0 and model["openpipe"]["trainedTokens"] == job["trained_tokens"]
    assert any(e["type"] == "metrics" and "train_loss" in e["data"] for e in events)
    [record] = await read_topic(
        running,
        CATALOG_TOPIC,
        lambda v: v["id"] == f"{project.id}/tiny-e2e" and v["data"]["status"] == "DEPLOYED",
    )
    adapter = record["data"]["adapter_uri"].rstrip("/") + "/"
    stored = await running.platform.blobs.list(adapter)
    names = {key.rsplit("/", 1)[-1] for key in stored}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= names, stored
    assert job["loss_curve"] and await running.platform.blobs.exists(job["loss_curve"])


async def test_a_trained_model_is_a_base_for_the_next(running: RunningPlatform, project: Project) -> None:
    parent, job_id = await make_run(running, project)
    adapter = f"fine_tunes/{project.id}/{parent}/{job_id}/adapter/"
    await Events(running, project, job_id).send(
        "status", status="succeeded", artifact_uri=adapter, trained_tokens=10
    )
    await wait_for_job(project, job_id, lambda j: j["status"] == "succeeded", "parent trained")
    dataset_id = await make_dataset(project, rows(3))
    async with project.client() as http:
        child = await http.post(
            "/models",
            json={"datasetId": dataset_id, "slug": "child", "trainingConfig": {"baseModel": parent}},
        )
        assert child.status_code == 200, child.text
        assert child.json()["openpipe"]["baseModel"] == parent
        child_job = child.json()["openpipe"]["jobId"]
    [request] = await read_topic(running, TRAINING_REQUESTS_TOPIC, lambda v: v["job_id"] == child_job)
    assert request["base_model"] == TINY and request["parent_adapter_uri"] == adapter
