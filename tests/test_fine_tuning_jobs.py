"""The OpenAI-shaped jobs API (``/files``, ``/fine_tuning/jobs``) through the official ``openai`` SDK.

Jobs are driven by ``training.events.v1`` events published on the real broker (no trainer needed);
``trainingConfig.provider: "openai"`` trains against OpenAI's API faked at the HTTP boundary.
"""

from __future__ import annotations

import asyncio
import json

import openai
import pytest

from services.api.fine_tuning import openai_provider
from services.common.events import CATALOG_TOPIC, TRAINING_REQUESTS_TOPIC
from tests.conftest import Project, RunningPlatform, wait_until
from tests.fake_openai_fine_tuning import FAKE, OPENAI_KEY
from tests.helpers_fine_tuning import (
    ABSENT_BASE,
    Events,
    make_dataset,
    make_run,
    read_topic,
    rows,
    wait_for_job,
)


def sdk(project: Project) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key=project.key, base_url=project.base_url, max_retries=0)


def jsonl(*lines: object) -> bytes:
    return (
        b"\n".join(line if isinstance(line, bytes) else json.dumps(line).encode() for line in lines) + b"\n"
    )


def chat(question: str, answer: str) -> dict:
    return {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
    }


def preference(question: str, good: str, bad: str) -> dict:
    return {
        "input": {"messages": [{"role": "user", "content": question}]},
        "preferred_output": [{"role": "assistant", "content": good}],
        "non_preferred_output": [{"role": "assistant", "content": bad}],
    }


async def test_upload_create_list_and_retrieve(running: RunningPlatform, project: Project) -> None:
    client = sdk(project)
    uploaded = await client.files.create(
        file=("train.jsonl", jsonl(*(chat(f"q{i}", f"a{i}") for i in range(5)))), purpose="fine-tune"
    )
    assert uploaded.status == "processed" and uploaded.purpose == "fine-tune" and uploaded.bytes > 0
    assert (await client.files.retrieve(uploaded.id)).filename == "train.jsonl"
    jobs = []
    for n in range(3):
        jobs.append(
            await client.fine_tuning.jobs.create(
                model=ABSENT_BASE,
                training_file=uploaded.id,
                suffix=f"run{n}",
                seed=7,
                metadata={"team": "blue" if n else "red"},
                method={
                    "type": "supervised",
                    "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 4}},
                },
            )
        )
    job = jobs[0]
    assert job.object == "fine_tuning.job" and job.status == "validating_files" and job.seed == 7
    assert job.fine_tuned_model is None and job.training_file == uploaded.id and job.model == ABSENT_BASE
    assert job.hyperparameters.n_epochs == 2 and job.hyperparameters.batch_size == 4
    assert job.method.type == "supervised" and job.user_provided_suffix == "run0"

    [request] = await read_topic(running, TRAINING_REQUESTS_TOPIC, lambda v: v["job_id"] == job.id)
    assert request["hyperparameters"]["num_epochs"] == 2 and request["hyperparameters"]["seed"] == 7
    lines = (await running.platform.blobs.get_bytes(request["snapshot_uri"])).splitlines()
    assert len(lines) == 5 and json.loads(lines[0])["split"] == "TRAIN"

    # The same run is a Model: the job's (eventual) fine_tuned_model is its slug.
    slug = request["model_slug"]
    assert slug.startswith("ft-llama-3-2-1b-instruct-run0-")
    model = await client.models.retrieve(slug)
    assert model.id == slug and model.model_extra["openpipe"]["jobId"] == job.id

    page = await client.fine_tuning.jobs.list(limit=2)
    assert [j.id for j in page.data] == [jobs[2].id, jobs[1].id] and page.has_more
    rest = await client.fine_tuning.jobs.list(limit=2, after=jobs[1].id)
    assert [j.id for j in rest.data] == [jobs[0].id] and not rest.has_more
    blue = await client.fine_tuning.jobs.list(metadata={"team": "blue"})
    assert sorted(j.id for j in blue.data) == sorted([jobs[1].id, jobs[2].id])
    assert (await client.fine_tuning.jobs.retrieve(job.id)).id == job.id
    events = await client.fine_tuning.jobs.list_events(job.id)
    assert any("Created fine-tuning job" in e.message for e in events.data)

    validation = await client.files.create(file=("valid.jsonl", jsonl(chat("v", "w"))), purpose="fine-tune")
    checked = await client.fine_tuning.jobs.create(
        model=ABSENT_BASE, training_file=uploaded.id, validation_file=validation.id
    )
    assert checked.validation_file == validation.id
    [request] = await read_topic(running, TRAINING_REQUESTS_TOPIC, lambda v: v["job_id"] == checked.id)
    assert (await running.platform.blobs.get_bytes(request["validation_snapshot_uri"])).count(b"\n") == 1


async def test_bad_lines_fail_the_job_with_their_line_numbers(project: Project) -> None:
    client = sdk(project)
    content = jsonl(
        chat("q", "a"),
        b'{"messages": [ oops',
        {"messages": [{"role": "user", "content": "no answer"}]},
        chat("q2", "a2"),
    )
    uploaded = await client.files.create(file=("bad.jsonl", content), purpose="fine-tune")
    assert uploaded.status == "error" and "line 2" in uploaded.status_details
    job = await client.fine_tuning.jobs.create(model=ABSENT_BASE, training_file=uploaded.id)
    assert job.status == "failed" and job.error.code == "invalid_file" and job.error.param == "training_file"
    assert (
        "line 2: invalid JSON" in job.error.message
        and "line 3: the last message must be the assistant" in job.error.message
    )
    model = (await client.models.retrieve(job.model_extra["model_slug"])).model_extra["openpipe"]
    assert model["status"] == "ERROR" and "line 2" in model["errorMessage"]
    with pytest.raises(openai.BadRequestError):
        await client.files.create(file=("x.jsonl", jsonl(chat("q", "a"))), purpose="assistants")


async def test_dataset_as_training_file_with_dpo(running: RunningPlatform, project: Project) -> None:
    client = sdk(project)
    dataset_id = await make_dataset(project, rows(4, rejected=True))
    job = await client.fine_tuning.jobs.create(
        model=ABSENT_BASE,
        training_file=dataset_id,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.3, "n_epochs": 1}}},
    )
    assert job.status == "validating_files" and job.method.type == "dpo"
    [request] = await read_topic(running, TRAINING_REQUESTS_TOPIC, lambda v: v["job_id"] == job.id)
    hyper = request["hyperparameters"]
    assert not hyper["enable_sft"] and hyper["enable_preference_tuning"]
    assert hyper["training_beta"] == 0.3 and hyper["preference_num_epochs"] == 1
    async with project.client() as http:
        assert (await http.get(f"/datasets/{dataset_id}")).json()["fine_tune_count"] == 1

    # DPO on a file without preference pairs fails clearly; with them it is queued.
    sft_only = await client.files.create(file=("sft.jsonl", jsonl(chat("q", "a"))), purpose="fine-tune")
    failed = await client.fine_tuning.jobs.create(
        model=ABSENT_BASE, training_file=sft_only.id, method={"type": "dpo"}
    )
    assert failed.status == "failed" and "no preference examples" in failed.error.message
    pairs = await client.files.create(
        file=("dpo.jsonl", jsonl(preference("capital of Sweden?", "Stockholm", "London"))),
        purpose="fine-tune",
    )
    queued = await client.fine_tuning.jobs.create(
        model=ABSENT_BASE, training_file=pairs.id, method={"type": "dpo"}
    )
    assert queued.status == "validating_files"


async def test_unknown_and_foreign_ids_and_bad_requests(make_project) -> None:  # type: ignore[no-untyped-def]
    mine, other = await make_project(), await make_project()
    client, theirs = sdk(mine), sdk(other)
    uploaded = await client.files.create(file=("t.jsonl", jsonl(chat("q", "a"))), purpose="fine-tune")
    job = await client.fine_tuning.jobs.create(model=ABSENT_BASE, training_file=uploaded.id)
    for call in (
        theirs.fine_tuning.jobs.retrieve(job.id),
        theirs.fine_tuning.jobs.list_events(job.id),
        theirs.fine_tuning.jobs.checkpoints.list(job.id),
        theirs.fine_tuning.jobs.cancel(job.id),
        theirs.files.retrieve(uploaded.id),
        theirs.fine_tuning.jobs.create(model=ABSENT_BASE, training_file=uploaded.id),
        client.fine_tuning.jobs.retrieve("ftjob-nope"),
    ):
        with pytest.raises(openai.NotFoundError):
            await call
    for kwargs, param in (
        ({"model": "no/such-base", "training_file": uploaded.id}, "model"),
        (
            {"model": ABSENT_BASE, "training_file": uploaded.id, "method": {"type": "reinforcement"}},
            "method.type",
        ),
        (
            {
                "model": ABSENT_BASE,
                "training_file": uploaded.id,
                "metadata": {f"k{i}": "v" for i in range(17)},
            },
            "metadata",
        ),
        ({"model": ABSENT_BASE, "training_file": uploaded.id, "suffix": "has space"}, "suffix"),
        ({"model": "gpt-4o-mini-2024-07-18", "training_file": uploaded.id}, "trainingConfig.provider"),
    ):
        with pytest.raises(openai.BadRequestError) as bad:
            await client.fine_tuning.jobs.create(**kwargs)
        assert bad.value.body["param"] == param, bad.value.body
    with pytest.raises(openai.BadRequestError):
        await client.fine_tuning.jobs.list(after="ftjob-nope")


async def test_pause_resume_cancel_publish_requests(running: RunningPlatform, project: Project) -> None:
    client = sdk(project)
    slug, job_id = await make_run(running, project)
    events = Events(running, project, job_id)
    await events.send("status", status="running")
    await wait_for_job(project, job_id, lambda j: j["status"] == "running", "running")
    paused = await client.fine_tuning.jobs.pause(job_id)
    assert paused.status == "paused"
    await events.send("status", status="running")  # sent before the trainer saw the pause: ignored
    await events.send("status", status="paused", message="Paused at step 3.")

    async def paused_event_applied() -> bool:
        return any(
            e.message == "Paused at step 3." for e in (await client.fine_tuning.jobs.list_events(job_id)).data
        )

    await wait_until(paused_event_applied, what="the trainer's paused event")
    assert (await client.fine_tuning.jobs.retrieve(job_id)).status == "paused"
    with pytest.raises(openai.BadRequestError):
        await client.fine_tuning.jobs.pause(job_id)
    assert (await client.fine_tuning.jobs.resume(job_id)).status == "queued"
    cancelled = await client.fine_tuning.jobs.cancel(job_id)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    with pytest.raises(openai.BadRequestError):
        await client.fine_tuning.jobs.cancel(job_id)
    actions = await read_topic(running, TRAINING_REQUESTS_TOPIC, lambda v: v["job_id"] == job_id)
    assert [(a["action"], a["request_id"]) for a in actions] == [
        ("pause", f"{job_id}:1"),
        ("resume", f"{job_id}:2"),
        ("cancel", f"{job_id}:3"),
    ]
    model = await client.models.retrieve(slug)
    assert model.model_extra["openpipe"]["status"] == "ERROR"
    assert model.model_extra["openpipe"]["errorMessage"] == "Training was cancelled."


async def test_metrics_events_and_checkpoints(running: RunningPlatform, project: Project) -> None:
    client = sdk(project)
    slug, job_id = await make_run(running, project)
    events = Events(running, project, job_id)
    await events.send("status", status="running")
    for step in (10, 20):
        data = {
            "step": step,
            "total_steps": 20,
            "train_loss": 2.0 / step,
            "train_mean_token_accuracy": step / 25,
        }
        await events.send("metrics", data=data)
        data = {**data, "full_valid_loss": 3.0 / step, "full_valid_mean_token_accuracy": step / 40}
        await events.send("metrics", data=data)  # the validation set, evaluated at the checkpoint
        await events.send(
            "checkpoint", data=data, artifact_uri=f"fine_tunes/{project.id}/{slug}/{job_id}/ckpt-{step}/"
        )
    await events.send("message", message="Uploading the adapter.")
    await events.send(
        "status",
        status="succeeded",
        artifact_uri=f"fine_tunes/{project.id}/{slug}/{job_id}/adapter/",
        trained_tokens=5000,
        data={"loss_curve_uri": f"fine_tunes/{project.id}/{slug}/{job_id}/loss.png"},
    )
    job = await wait_for_job(project, job_id, lambda j: j["status"] == "succeeded", "succeeded")
    assert job["fine_tuned_model"] == slug and job["loss_curve"].endswith("loss.png")
    listed = await client.fine_tuning.jobs.list_events(job_id, limit=50)
    metrics = [e for e in listed.data if e.type == "metrics"]
    assert [e.data["step"] for e in metrics] == [20, 20, 10, 10]  # newest first
    assert metrics[0].message == (
        "Step 20/20: training loss=0.1000, token accuracy=0.800, full validation loss=0.1500, "
        "full validation token accuracy=0.500"
    )
    assert any(e.message == "Uploading the adapter." for e in listed.data)
    first = await client.fine_tuning.jobs.list_events(job_id, limit=2)
    after = await client.fine_tuning.jobs.list_events(job_id, limit=2, after=first.data[-1].id)
    assert first.has_more and not set(e.id for e in first.data) & set(e.id for e in after.data)
    checkpoints = await client.fine_tuning.jobs.checkpoints.list(job_id)
    assert [c.step_number for c in checkpoints.data] == [20, 10]
    assert checkpoints.data[0].metrics.train_loss == pytest.approx(0.1)
    assert checkpoints.data[0].metrics.full_valid_loss == pytest.approx(0.15)
    assert checkpoints.data[0].metrics.full_valid_mean_token_accuracy == pytest.approx(0.5)
    assert checkpoints.data[0].fine_tuned_model_checkpoint == f"{slug}:ckpt-step-20"
    older = await client.fine_tuning.jobs.checkpoints.list(job_id, after=checkpoints.data[0].id)
    assert [c.step_number for c in older.data] == [10]


async def test_openai_provider_trains_through_openai(
    running: RunningPlatform, project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(openai_provider, "POLL_SECONDS", 0.2)
    async with project.client() as http:
        assert (await http.put("/provider-keys", json={"openai": OPENAI_KEY})).status_code == 200
    dataset_id = await make_dataset(project, rows(4))
    async with project.client() as http:
        created = await http.post(
            "/models",
            json={
                "datasetId": dataset_id,
                "slug": "openai-tuned",
                "trainingConfig": {
                    "provider": "openai",
                    "baseModel": "gpt-4o-mini-2024-07-18",
                    "sft_hyperparameters": {"n_epochs": 2},
                },
            },
        )
        assert created.status_code == 200, created.text
        job_id = created.json()["openpipe"]["jobId"]
    job = await wait_for_job(project, job_id, lambda j: j["status"] == "succeeded", "OpenAI job", timeout=30)
    assert job["fine_tuned_model"] == "openai-tuned" and job["trained_tokens"] == 1234
    assert job["cost_usd"] == pytest.approx(1234 * 3.0 / 1_000_000)
    upstream = next(
        j for j in FAKE.jobs.values() if (j.get("metadata") or {}).get("distillery_job") == job_id
    )
    assert upstream["model"] == "gpt-4o-mini-2024-07-18"
    assert upstream["method"] == {
        "type": "supervised",
        "supervised": {
            "hyperparameters": {"batch_size": "auto", "learning_rate_multiplier": 1.0, "n_epochs": 2}
        },
    }
    sent = FAKE.files[upstream["training_file"]].splitlines()
    assert len(sent) == 4 and json.loads(sent[0])["messages"][-1]["role"] == "assistant"
    events = (await sdk(project).fine_tuning.jobs.list_events(job_id, limit=50)).data
    assert any(e.type == "metrics" and e.data["train_loss"] == 0.9 for e in events)
    [record] = await read_topic(
        running,
        CATALOG_TOPIC,
        lambda v: v["id"] == f"{project.id}/openai-tuned" and v["data"]["status"] == "DEPLOYED",
    )
    assert record["data"]["provider"] == "openai"
    assert (
        record["data"]["upstream_model"]
        == f"ft:gpt-4o-mini-2024-07-18:distillery:model:{upstream['id'][-8:]}"
    )
    model = (await sdk(project).models.retrieve("openai-tuned")).model_extra
    assert model["openpipe"]["status"] == "DEPLOYED" and model["pricing"] == {"chatIn": 0.3, "chatOut": 1.2}
    await asyncio.sleep(0)


async def test_cli_train_and_jobs_watch(running: RunningPlatform, project: Project) -> None:
    from typer.testing import CliRunner

    from services.cli import app

    runner = CliRunner()
    env = {"DISTILLERY_BASE_URL": project.base_url, "DISTILLERY_API_KEY": project.key, "COLUMNS": "160"}
    dataset_id = await make_dataset(project, rows(3))
    started = await asyncio.to_thread(
        runner.invoke,
        app,
        [
            "train",
            "--dataset",
            dataset_id,
            "--base",
            ABSENT_BASE,
            "--slug",
            "cli-model",
            "--epochs",
            "1",
            "--no-watch",
        ],
        env=env,
    )
    assert started.exit_code == 0, started.output
    assert "cli-model" in started.output and "job ftjob-" in started.output
    refused = await asyncio.to_thread(
        runner.invoke, app, ["train", "--dataset", "ds_nope", "--no-watch"], env=env
    )
    assert refused.exit_code == 1 and "No dataset" in refused.output

    slug, job_id = await make_run(running, project)
    events = Events(running, project, job_id)
    await events.send("status", status="running")
    await events.send(
        "metrics", data={"step": 10, "total_steps": 10, "train_loss": 0.4321, "tokens_per_second": 6000}
    )
    await events.send("status", status="succeeded", artifact_uri="fine_tunes/x/adapter/", trained_tokens=4200)
    await wait_for_job(project, job_id, lambda j: j["status"] == "succeeded", "succeeded")
    watched = await asyncio.to_thread(runner.invoke, app, ["jobs", "watch", job_id], env=env)
    assert watched.exit_code == 0, watched.output
    assert "10/10" in watched.output and "0.4321" in watched.output and "6,000 tok/s" in watched.output
    assert f"model {slug}" in watched.output and "4,200 training tokens" in watched.output


@pytest.mark.slow
async def test_end_to_end_jobs_api_on_tiny_chat(running: RunningPlatform, project: Project) -> None:
    """A file → ``fine_tuning.jobs.create`` → the trainer → succeeded, with metrics events and
    checkpoints, the validation file's loss in both."""
    client = sdk(project)
    uploaded = await client.files.create(
        file=("train.jsonl", jsonl(*(chat(f"What is {i}+{i}?", str(2 * i)) for i in range(8)))),
        purpose="fine-tune",
    )
    validation = await client.files.create(
        file=("valid.jsonl", jsonl(*(chat(f"What is {i}+{i}?", str(2 * i)) for i in range(8, 11)))),
        purpose="fine-tune",
    )
    job = await client.fine_tuning.jobs.create(
        model="distillery/tiny-chat",
        training_file=uploaded.id,
        validation_file=validation.id,
        suffix="e2e",
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1}}},
    )
    done = await wait_for_job(
        project, job.id, lambda j: j["status"] in ("succeeded", "failed"), "trained", timeout=240
    )
    assert done["status"] == "succeeded", done["error"]
    assert done["fine_tuned_model"] == job.model_extra["model_slug"] and done["trained_tokens"] > 0
    events = (await client.fine_tuning.jobs.list_events(job.id, limit=1000)).data
    assert any(e.type == "metrics" and e.data.get("train_loss") is not None for e in events)
    checkpoints = (await client.fine_tuning.jobs.checkpoints.list(job.id)).data
    assert checkpoints and all(
        c.fine_tuned_model_checkpoint.startswith(done["fine_tuned_model"]) for c in checkpoints
    )
    assert all(c.metrics.full_valid_loss > 0 for c in checkpoints)
    assert all(0 <= c.metrics.full_valid_mean_token_accuracy <= 1 for c in checkpoints)
    valid = [e for e in events if e.type == "metrics" and e.data.get("full_valid_loss") is not None]
    assert {e.data["step"] for e in valid} == {c.step_number for c in checkpoints}
    assert await running.platform.blobs.exists(
        checkpoints[0].model_extra["uri"].rstrip("/") + "/adapter_config.json"
    )

    async def deployed() -> bool:  # once its adapter answers a probe on the model server
        model = await client.models.retrieve(done["fine_tuned_model"])
        assert model.model_extra["openpipe"]["status"] in ("PROVISIONING", "DEPLOYED"), model.model_extra
        return model.model_extra["openpipe"]["status"] == "DEPLOYED"

    await wait_until(deployed, timeout=180, what="the trained model DEPLOYED")


async def test_openai_provider_failure_is_mirrored(project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(openai_provider, "POLL_SECONDS", 0.2)
    client = sdk(project)
    async with project.client() as http:
        assert (await http.put("/provider-keys", json={"openai": OPENAI_KEY})).status_code == 200
    uploaded = await client.files.create(
        file=("t.jsonl", jsonl(chat("please [fail]", "no"))), purpose="fine-tune"
    )
    job = await client.fine_tuning.jobs.create(model="gpt-4o-mini-2024-07-18", training_file=uploaded.id)
    assert job.status == "validating_files" and job.model == "gpt-4o-mini-2024-07-18"
    done = await wait_for_job(
        project, job.id, lambda j: j["status"] == "failed", "OpenAI failure", timeout=30
    )
    assert (
        done["error"]["code"] == "invalid_training_file"
        and "OpenAI fine-tuning failed" in done["error"]["message"]
    )
    model = (await client.models.retrieve(done["model_slug"])).model_extra["openpipe"]
    assert model["status"] == "ERROR" and model["provider"] == "openai"
    with pytest.raises(openai.BadRequestError):
        await client.fine_tuning.jobs.pause(job.id)
