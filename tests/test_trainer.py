"""The trainer: real LoRA training of distillery/tiny-chat in child processes, a few steps each.

Unhappy inputs are checked in-process (they fail before any training); runs, crashes, restarts,
pause/resume and cancel go through ``LocalTrainer`` with real child processes; the Kafka side
(requests in, events out, poison to the DLQ) through a platform running only the trainer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import secrets
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch
from aiokafka import AIOKafkaProducer
from pydantic import ValidationError

from services.common.blobstore import BlobStore, FileBlobStore, blob_store_from_url
from services.common.events import (
    TRAINING_EVENTS_TOPIC,
    TRAINING_REQUESTS_TOPIC,
    DeadLetter,
    TrainingEvent,
    TrainingHyperparameters,
    TrainingRequest,
    dlq_topic,
)
from services.common.model_store import TINY_CHAT, ensure_base_model
from services.common.settings import Settings
from services.platform import Platform
from services.trainer.job import (
    WEIGHTED_ADAPTER,
    Run,
    read_events,
    save_active_adapter,
    weigh_preference_adapter,
)
from services.trainer.service import LocalTrainer, kill_child
from tests.conftest import platform_settings, wait_until

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def sum_rows(n: int, *, rejected: bool = False, seed: int = 0) -> list[dict]:
    rnd = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rnd.randint(0, 50), rnd.randint(0, 50)
        row = {
            "messages": [
                {"role": "system", "content": "Add the numbers. PRUNE ME"},
                {"role": "user", "content": f"{a} + {b}"},
                {"role": "assistant", "content": str(a + b)},
            ],
            "split": "TRAIN",
            "metadata": {},
        }
        if rejected:
            row["rejected_message"] = {"role": "assistant", "content": str(a + b + 1)}
        rows.append(row)
    return rows


async def put_snapshot(blobs: BlobStore, rows: list[dict]) -> str:
    key = f"snapshots/ds_test/{uuid.uuid4().hex}.jsonl"
    await blobs.put_bytes(key, b"".join(json.dumps(r).encode() + b"\n" for r in rows))
    return key


def request_for(
    snapshot: str, *, job_id: str | None = None, base: str = TINY_CHAT, **hyper: object
) -> TrainingRequest:
    job_id = job_id or f"ftjob-{secrets.token_hex(4)}"
    return TrainingRequest(
        request_id=f"{job_id}:1",
        job_id=job_id,
        project_id="proj_test",
        model_slug=f"m-{job_id}",
        base_model=base,
        snapshot_uri=snapshot,
        pruning_rules=["PRUNE ME"],
        hyperparameters=TrainingHyperparameters(**{"num_epochs": 1, "batch_size": 4, **hyper}),
        output_prefix=f"fine-tunes/proj_test/m-{job_id}/{job_id}",
    )


@pytest.fixture(scope="module")
def model_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("model-store")
    ensure_base_model(TINY_CHAT, store_dir=store)
    return store


class Events:
    """What a LocalTrainer published, per job, in order."""

    def __init__(self) -> None:
        self.all: list[TrainingEvent] = []

    async def publish(self, event: TrainingEvent) -> None:
        self.all.append(event)

    def of(self, job_id: str) -> list[TrainingEvent]:
        return [e for e in self.all if e.job_id == job_id]

    def statuses(self, job_id: str) -> list[str]:
        return [e.status for e in self.of(job_id) if e.type == "status" and e.status]

    def has(self, job_id: str, **match: object) -> bool:
        return any(all(getattr(e, k) == v for k, v in match.items()) for e in self.of(job_id))


@pytest.fixture
async def local(
    tmp_path: Path, model_store: Path
) -> AsyncIterator[tuple[LocalTrainer, Events, FileBlobStore]]:
    blobs = FileBlobStore(tmp_path / "blobs")
    await blobs.ensure_ready()
    settings = Settings(data_dir=tmp_path, model_store_dir=model_store)
    events = Events()
    trainer = LocalTrainer(settings, events.publish)
    await trainer.start()
    yield trainer, events, blobs
    await trainer.stop()


async def wait_status(events: Events, job_id: str, status: str, timeout: float = 120) -> None:
    await wait_until(lambda: status in events.statuses(job_id), timeout=timeout, what=f"{job_id} {status}")


# --- bad inputs: clear errors, before any training -------------------------------------------------


@pytest.mark.parametrize(
    ("rows", "base", "hyper", "code", "words"),
    [
        ([], TINY_CHAT, {}, "empty_dataset", "empty"),
        (
            [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}],
            TINY_CHAT,
            {},
            "no_assistant_outputs",
            "assistant output",
        ),
        (sum_rows(4), "meta-llama/Llama-3.1-8B-Instruct", {}, "base_model_unavailable", "not available"),
        (sum_rows(4), "acme/half-uploaded", {}, "base_model_unavailable", "no weights"),
        (
            sum_rows(4),
            TINY_CHAT,
            {"enable_preference_tuning": True},
            "no_preference_rows",
            "rejected_message",
        ),
        (["not json"], TINY_CHAT, {}, "invalid_training_data", "line 1 is not valid JSON"),
    ],
    ids=["empty", "no-assistant", "unknown-base", "weights-absent", "dpo-without-pairs", "malformed"],
)
async def test_bad_inputs_fail_the_run_with_a_clear_error(
    rows: list, base: str, hyper: dict, code: str, words: str, tmp_path: Path, model_store: Path
) -> None:
    blobs = FileBlobStore(tmp_path / "blobs")
    (blobs.root / "models" / "acme" / "half-uploaded").mkdir(parents=True)
    (blobs.root / "models" / "acme" / "half-uploaded" / "config.json").write_text("{}")
    if rows and rows[0] == "not json":
        key = "snapshots/bad.jsonl"
        await blobs.put_bytes(key, b"{not json\n")
    else:
        key = await put_snapshot(blobs, rows)
    run = Run(request_for(key, base=base, **hyper), tmp_path / "work", blobs=blobs, store_dir=model_store)
    assert await asyncio.to_thread(run.execute) == "failed"
    final = read_events(tmp_path / "work" / "events.jsonl")[-1]
    assert final["status"] == "failed" and final["error_code"] == code and final["level"] == "error"
    assert words in final["message"]
    assert await blobs.list("fine-tunes/") == []


async def test_missing_snapshot_is_a_clear_error(tmp_path: Path, model_store: Path) -> None:
    blobs = FileBlobStore(tmp_path / "blobs")
    run = Run(request_for("snapshots/gone.jsonl"), tmp_path / "w", blobs=blobs, store_dir=model_store)
    assert await asyncio.to_thread(run.execute) == "failed"
    final = read_events(tmp_path / "w" / "events.jsonl")[-1]
    assert final["error_code"] == "missing_input" and "snapshots/gone.jsonl" in final["message"]


# --- real runs ------------------------------------------------------------------------------------


def assert_adapter(keys: list[str], prefix: str) -> None:
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "chat_template.jinja"):
        assert f"{prefix}/adapter/{name}" in keys, keys
    assert f"{prefix}/loss_curve.png" in keys
    assert any(
        k.startswith(f"{prefix}/checkpoints/") and k.endswith("adapter_model.safetensors") for k in keys
    )


async def test_sft_run_uploads_adapter_checkpoints_and_loss_curve_to_s3(
    tmp_path: Path, model_store: Path, s3_url: str
) -> None:
    # (file:// is the store of the crash test below.)
    blob_url = f"{s3_url.rsplit('/', 1)[0]}/tr-{uuid.uuid4().hex[:12]}"
    blobs = blob_store_from_url(blob_url)
    await blobs.ensure_ready()
    events = Events()
    settings = Settings(data_dir=tmp_path, model_store_dir=model_store, blob_url=blob_url)
    trainer = LocalTrainer(settings, events.publish)
    await trainer.start()
    try:
        job = request_for(await put_snapshot(blobs, sum_rows(8)))
        await trainer.handle(job)
        await trainer.handle(job)  # a redelivered start is not a second run
        await wait_status(events, job.job_id, "succeeded")
    finally:
        await trainer.stop()
    mine = events.of(job.job_id)
    assert [e.seq for e in mine] == list(range(len(mine)))
    assert len({e.event_id for e in mine}) == len(mine)
    assert events.statuses(job.job_id) == ["queued", "running", "succeeded"]
    metrics = [e.data for e in mine if e.type == "metrics"]
    assert [m["step"] for m in metrics] == [1, 2] and all(m["total_steps"] == 2 for m in metrics)
    assert all(m["train_loss"] > 0 and 0 <= m["train_mean_token_accuracy"] <= 1 for m in metrics)
    assert all(m["tokens_per_second"] > 0 for m in metrics)
    checkpoints = [e for e in mine if e.type == "checkpoint"]
    assert checkpoints and all(e.artifact_uri.startswith(job.output_prefix) for e in checkpoints)
    final = mine[-1]
    assert final.artifact_uri == f"{job.output_prefix}/adapter" and final.trained_tokens > 0
    assert final.data["loss_curve_uri"] == f"{job.output_prefix}/loss_curve.png"
    keys = await blobs.list(job.output_prefix)
    assert_adapter(keys, job.output_prefix)
    assert (await blobs.get_bytes(f"{job.output_prefix}/loss_curve.png")).startswith(b"\x89PNG")
    config = json.loads(await blobs.get_bytes(f"{job.output_prefix}/adapter/adapter_config.json"))
    assert config["base_model_name_or_path"] == TINY_CHAT and config["peft_type"] == "LORA"
    local = tmp_path / "trainer" / "jobs" / job.job_id
    assert (local / "events.jsonl").exists() and not (local / "sft").exists()  # local checkpoints dropped


@pytest.mark.slow
async def test_sft_then_dpo_continues_from_the_sft_adapter(local, tmp_path: Path) -> None:
    trainer, events, blobs = local
    job = request_for(
        await put_snapshot(blobs, sum_rows(8, rejected=True)),
        enable_preference_tuning=True,
        preference_num_epochs=1,
    )
    await trainer.handle(job)
    await wait_status(events, job.job_id, "succeeded", timeout=240)
    phases = [e.data["phase"] for e in events.of(job.job_id) if e.type == "metrics"]
    assert phases == ["sft", "sft", "dpo", "dpo"]
    dpo = [e.data for e in events.of(job.job_id) if e.type == "metrics" and e.data["phase"] == "dpo"]
    assert all(abs(m["train_loss"] - 0.693) < 0.05 for m in dpo[:1])  # starts at log(2): ref == policy
    assert_adapter(await blobs.list(job.output_prefix), job.output_prefix)


async def test_killed_run_resumes_from_its_checkpoint_then_a_restarted_service_finishes_it(
    tmp_path: Path, model_store: Path
) -> None:
    blobs = FileBlobStore(tmp_path / "blobs")
    settings = Settings(data_dir=tmp_path, model_store_dir=model_store, blob_url=f"file://{blobs.root}")
    events = Events()
    trainer = LocalTrainer(settings, events.publish, max_attempts=3)
    await trainer.start()
    job = request_for(await put_snapshot(blobs, sum_rows(16)), batch_size=2)  # 8 steps, checkpoints every 2
    await trainer.handle(job)
    await wait_until(lambda: events.has(job.job_id, type="checkpoint"), timeout=120, what="first checkpoint")
    kill_child(trainer.children[job.job_id])
    await wait_until(
        lambda: any("resuming from the last checkpoint" in e.message for e in events.of(job.job_id)),
        timeout=30,
        what="resume notice",
    )
    await wait_until(lambda: job.job_id in trainer.children, timeout=30, what="second run")
    await trainer.stop()  # the service goes away mid-run ...
    assert events.statuses(job.job_id)[-1] == "running"

    trainer = LocalTrainer(settings, events.publish, max_attempts=3)  # ... and comes back
    await trainer.start()
    try:
        await wait_status(events, job.job_id, "succeeded", timeout=180)
    finally:
        await trainer.stop()
    mine = events.of(job.job_id)
    assert [e.seq for e in mine] == list(range(len(mine)))  # relayed once each, in order
    resumed = [e.message for e in mine if e.type == "status" and e.status == "running"]
    assert resumed[0].startswith("Training started") and resumed[-1].startswith("Resuming training")
    steps = [e.data["step"] for e in mine if e.type == "metrics"]
    assert steps[-1] == 8 and len(steps) < 8 * 3  # later runs went on from checkpoints, not from step 1
    assert_adapter(await blobs.list(job.output_prefix), job.output_prefix)


async def test_a_run_restarted_after_sft_finished_still_uploads_its_loss_curve(
    tmp_path: Path, model_store: Path
) -> None:
    blobs = FileBlobStore(tmp_path / "blobs")
    job = request_for(await put_snapshot(blobs, sum_rows(4)), batch_size=2)
    first = Run(job, tmp_path / "work", blobs=blobs, store_dir=model_store)
    assert await asyncio.to_thread(first.execute) == "succeeded"
    # Started again in the same folder (as if it died after SFT): no step runs, the curve still comes.
    again = job.model_copy(update={"output_prefix": f"{job.output_prefix}-again"})
    run = Run(again, tmp_path / "work", blobs=blobs, store_dir=model_store)
    assert await asyncio.to_thread(run.execute) == "succeeded"
    assert [step for _, step, _ in run.losses] == [1, 2]
    assert (await blobs.get_bytes(f"{again.output_prefix}/loss_curve.png")).startswith(b"\x89PNG")


async def test_a_run_that_keeps_dying_fails_clearly(tmp_path: Path, model_store: Path) -> None:
    blobs = FileBlobStore(tmp_path / "blobs")
    settings = Settings(data_dir=tmp_path, model_store_dir=model_store, blob_url=f"file://{blobs.root}")
    events = Events()
    trainer = LocalTrainer(settings, events.publish, max_attempts=1)
    await trainer.start()
    try:
        job = request_for(await put_snapshot(blobs, sum_rows(8)))
        await trainer.handle(job)
        await wait_until(lambda: job.job_id in trainer.children, timeout=30, what="run started")
        kill_child(trainer.children[job.job_id])
        await wait_status(events, job.job_id, "failed", timeout=30)
    finally:
        await trainer.stop()
    final = events.of(job.job_id)[-1]
    assert final.error_code == "trainer_crashed" and "exited with code -9" in final.message


async def test_pause_resume_and_cancel(local) -> None:
    trainer, events, blobs = local
    # 48 steps: the run must still be training when the pause lands (events are relayed every 0.5 s,
    # so under load it lands several steps after the first one) and again when the cancel lands
    # after the resume (on a quiet box the tiny model takes a few steps per relay).
    first = request_for(await put_snapshot(blobs, sum_rows(96)), batch_size=2)
    second = request_for(await put_snapshot(blobs, sum_rows(8)))
    await trainer.handle(first)
    await trainer.handle(second)  # waits behind the first
    await trainer.handle(second.model_copy(update={"action": "cancel", "request_id": f"{second.job_id}:2"}))
    assert events.statuses(second.job_id) == ["queued", "cancelled"]

    await wait_until(lambda: events.has(first.job_id, type="metrics"), timeout=120, what="first step")
    await trainer.handle(first.model_copy(update={"action": "pause"}))
    await wait_status(events, first.job_id, "paused", timeout=60)
    paused_at = max(e.data["step"] for e in events.of(first.job_id) if e.type == "metrics")
    assert paused_at < 48
    assert events.has(first.job_id, type="checkpoint")  # pausing saves a checkpoint to resume from
    await trainer.handle(first.model_copy(update={"action": "resume"}))
    await wait_until(
        lambda: [e.data["step"] for e in events.of(first.job_id) if e.type == "metrics"][-1] > paused_at,
        timeout=120,
        what="steps after resume",
    )
    await trainer.handle(first.model_copy(update={"action": "cancel"}))
    await wait_status(events, first.job_id, "cancelled", timeout=60)
    assert events.statuses(first.job_id) == ["queued", "running", "paused", "queued", "running", "cancelled"]
    resumed_steps = [e.data["step"] for e in events.of(first.job_id) if e.type == "metrics"]
    assert resumed_steps[resumed_steps.index(paused_at) + 1] == paused_at + 1  # went on, not from step 1
    assert not await blobs.exists(f"{first.output_prefix}/adapter/adapter_model.safetensors")
    await trainer.handle(first.model_copy(update={"action": "resume"}))  # finished jobs stay finished
    assert events.statuses(first.job_id)[-1] == "cancelled"


# --- over Kafka -----------------------------------------------------------------------------------


def training_events(values: list[bytes]) -> list[TrainingEvent]:
    """The topic's records that are training events: the topic is the session broker's, shared by
    every test, and some (tests/test_models_api.py) publish poison there to test the api's DLQ."""
    events = []
    for value in values:
        with contextlib.suppress(ValidationError):
            events.append(TrainingEvent.model_validate_json(value))
    return events


async def read_all(kafka_url: str, topic: str) -> list[bytes]:
    from tests.helpers import read_topic

    return await read_topic(kafka_url, topic)


async def test_requests_over_kafka_events_back_and_poison_to_the_dlq(
    tansu, chdb_url: str, tmp_path: Path, model_store: Path
) -> None:
    settings = platform_settings(tmp_path, tansu.url, chdb_url, model_store_dir=model_store)
    platform = Platform(settings, services=("trainer",))
    await platform.start()
    producer = AIOKafkaProducer(bootstrap_servers=tansu.url)
    await producer.start()
    try:
        job = request_for("snapshots/none.jsonl", base="acme/never-uploaded")
        await producer.send_and_wait(TRAINING_REQUESTS_TOPIC, b"{not json", key=b"poison-1")
        await producer.send_and_wait(
            TRAINING_REQUESTS_TOPIC,
            json.dumps({"job_id": "x", "action": "explode"}).encode(),
            key=b"poison-2",
        )
        await producer.send_and_wait(
            TRAINING_REQUESTS_TOPIC, job.model_dump_json().encode(), key=job.job_id.encode()
        )

        async def failed() -> list[TrainingEvent]:
            values = await read_all(tansu.url, TRAINING_EVENTS_TOPIC)
            return [e for e in training_events(values) if e.job_id == job.job_id]

        async def finished() -> bool:
            return any(e.status == "failed" for e in await failed())

        await wait_until(finished, timeout=90, what="failed event on training.events.v1")
        mine = await failed()
        assert [e.event_id for e in mine] == [f"{job.job_id}:{i}" for i in range(len(mine))]
        assert mine[-1].error_code == "missing_input"

        async def letters() -> list[DeadLetter]:
            values = await read_all(tansu.url, dlq_topic(TRAINING_REQUESTS_TOPIC))
            return [
                d for d in map(DeadLetter.model_validate_json, values) if d.key in ("poison-1", "poison-2")
            ]

        async def parked() -> bool:
            return len(await letters()) == 2

        await wait_until(parked, timeout=30, what="two dead letters")
        reasons = {d.key: d.reason for d in await letters()}
        assert "not a TrainingRequest" in reasons["poison-1"]
        assert "action" in reasons["poison-2"] or "request_id" in reasons["poison-2"]
    finally:
        await producer.stop()
        await platform.stop()


# --- validation file ------------------------------------------------------------------------------


def valid_metrics(events: list[dict]) -> list[dict]:
    return [e["data"] for e in events if e["type"] == "metrics" and "full_valid_loss" in e["data"]]


async def test_a_validation_file_is_evaluated_whole_at_every_checkpoint_and_the_end(
    tmp_path: Path, model_store: Path
) -> None:
    blobs = FileBlobStore(tmp_path / "blobs")
    train = await put_snapshot(blobs, sum_rows(12))
    valid_rows = sum_rows(5, seed=1)
    valid_rows[0]["split"] = "TEST"  # a validation file's rows all count, whatever their split
    job = request_for(train, batch_size=4)  # 3 steps, a checkpoint each
    with_valid = job.model_copy(update={"validation_snapshot_uri": await put_snapshot(blobs, valid_rows)})
    run = Run(with_valid, tmp_path / "valid", blobs=blobs, store_dir=model_store)
    assert await asyncio.to_thread(run.execute) == "succeeded"
    events = read_events(tmp_path / "valid" / "events.jsonl")
    assert any(e["message"].startswith("Loaded 5 validation rows") for e in events)
    valid = valid_metrics(events)
    assert [m["step"] for m in valid] == [1, 2, 3]  # every checkpoint, the last one at the end
    for m in valid:
        assert math.isfinite(m["full_valid_loss"]) and m["full_valid_loss"] > 0
        assert 0 <= m["full_valid_mean_token_accuracy"] <= 1
        assert m["phase"] == "sft" and m["total_steps"] == 3
    assert valid[-1]["full_valid_loss"] < valid[0]["full_valid_loss"]  # it learns the sums
    checkpoints = {e["data"]["step"]: e["data"] for e in events if e["type"] == "checkpoint"}
    assert sorted(checkpoints) == [1, 2, 3]
    for m in valid:
        assert checkpoints[m["step"]]["full_valid_loss"] == m["full_valid_loss"]
        assert checkpoints[m["step"]]["train_loss"] > 0

    # Without a validation file: no evaluation, and the very same training (evaluation neither
    # counts into the training loss and token accuracy nor moves the RNG training draws from).
    plain = Run(job, tmp_path / "plain", blobs=blobs, store_dir=model_store)
    assert await asyncio.to_thread(plain.execute) == "succeeded"
    plain_events = read_events(tmp_path / "plain" / "events.jsonl")
    assert valid_metrics(plain_events) == []
    assert not any("valid" in key for e in plain_events for key in e.get("data", {}))

    def training(events: list[dict]) -> list[tuple]:
        return [
            (e["data"]["step"], e["data"]["train_loss"], e["data"]["train_mean_token_accuracy"])
            for e in events
            if e["type"] == "metrics" and "full_valid_loss" not in e["data"]
        ]

    assert training(events) == training(plain_events)
    assert run.trained_tokens == plain.trained_tokens


@pytest.mark.parametrize(
    ("valid_rows", "code", "words"),
    [
        (
            [{"messages": [{"role": "user", "content": "1 + 1"}, {"role": "assistant", "content": ""}]}] * 3,
            "no_validation_outputs",
            "None of the validation file's 3 rows has an assistant output",
        ),
        (None, "missing_input", "snapshots/valid-gone.jsonl"),
    ],
    ids=["no-assistant-outputs", "missing-blob"],
)
async def test_a_bad_validation_file_fails_the_run_before_training(
    valid_rows: list | None, code: str, words: str, tmp_path: Path, model_store: Path
) -> None:
    blobs = FileBlobStore(tmp_path / "blobs")
    key = await put_snapshot(blobs, valid_rows) if valid_rows else "snapshots/valid-gone.jsonl"
    job = request_for(await put_snapshot(blobs, sum_rows(4))).model_copy(
        update={"validation_snapshot_uri": key}
    )
    run = Run(job, tmp_path / "work", blobs=blobs, store_dir=model_store)
    assert await asyncio.to_thread(run.execute) == "failed"
    events = read_events(tmp_path / "work" / "events.jsonl")
    assert events[-1]["error_code"] == code and words in events[-1]["message"]
    assert not any(e["type"] == "metrics" for e in events)  # nothing trained
    assert await blobs.list("fine-tunes/") == []


# --- adapter_weight -------------------------------------------------------------------------------


class Toy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(6, 8)
        self.down = torch.nn.Linear(8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


def lora_deltas(model: torch.nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    from peft.tuners.lora import LoraLayer

    return {
        name: module.get_delta_weight(adapter).detach().clone()
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and adapter in module.lora_A
    }


@pytest.mark.parametrize("weight", [0.0, 0.5, 2.0])
def test_adapter_weight_scales_what_dpo_changed_exactly(weight: float, tmp_path: Path) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(0)
    base_state = Toy().state_dict()

    def toy() -> Toy:
        model = Toy()
        model.load_state_dict(base_state)
        return model

    # Random A and B (not LoRA's zero B): "default" as trained by DPO, "ref" as it started (another
    # rank and alpha, so each adapter's own scaling must be applied).
    model = get_peft_model(
        toy(), LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"], init_lora_weights=False)
    )
    model.add_adapter(
        "ref", LoraConfig(r=2, lora_alpha=6, target_modules=["up", "down"], init_lora_weights=False)
    )
    dpo, ref = lora_deltas(model, "default"), lora_deltas(model, "ref")
    assert all(not torch.allclose(dpo[n], ref[n]) for n in dpo)

    assert weigh_preference_adapter(model, weight) == 6  # ranks concatenated
    assert list(model.peft_config) == [WEIGHTED_ADAPTER]
    combined = lora_deltas(model, WEIGHTED_ADAPTER)
    assert combined.keys() == dpo.keys()
    for name in dpo:
        torch.testing.assert_close(combined[name], ref[name] + weight * (dpo[name] - ref[name]))

    # Saved as the folder's own adapter, it loads with PeftModel.from_pretrained and merges the same.
    save_active_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 6 and config["lora_alpha"] == 6
    assert not (tmp_path / "adapter" / WEIGHTED_ADAPTER).exists()
    merged = PeftModel.from_pretrained(toy(), tmp_path / "adapter").merge_and_unload()
    for name in ("up", "down"):
        expected = (
            base_state[f"{name}.weight"]
            + ref[f"base_model.model.{name}"]
            + weight * (dpo[f"base_model.model.{name}"] - ref[f"base_model.model.{name}"])
        )
        torch.testing.assert_close(getattr(merged, name).weight.detach(), expected)


def merged_weights(base_dir: Path, adapter: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter).merge_and_unload().state_dict()


async def test_adapter_weight_zero_keeps_the_sft_adapter_after_dpo(tmp_path: Path, model_store: Path) -> None:
    blobs = FileBlobStore(tmp_path / "blobs")
    job = request_for(
        await put_snapshot(blobs, sum_rows(8, rejected=True)),
        enable_preference_tuning=True,
        preference_num_epochs=1,
        adapter_weight=0.0,
    )
    run = Run(job, tmp_path / "work", blobs=blobs, store_dir=model_store)
    assert await asyncio.to_thread(run.execute) == "succeeded"
    events = read_events(tmp_path / "work" / "events.jsonl")
    assert any(e["type"] == "metrics" and e["data"]["phase"] == "dpo" for e in events)  # DPO did train
    [applied] = [e for e in events if e["message"].startswith("Adapter weight 0 applied")]
    assert applied["data"] == {"adapter_weight": 0.0, "lora_rank": 32}
    final = tmp_path / "work" / "final"
    assert json.loads((final / "adapter_config.json").read_text())["r"] == 32  # SFT's 16 + DPO's 16
    assert json.loads((final / "distillery_adapter.json").read_text())["adapter_weight"] == 0.0
    base_dir = ensure_base_model(TINY_CHAT, store_dir=model_store)
    sft = merged_weights(base_dir, tmp_path / "work" / "sft" / "final")
    weighted = merged_weights(base_dir, final)
    assert sft.keys() == weighted.keys()
    for name in sft:
        torch.testing.assert_close(weighted[name], sft[name], rtol=1e-5, atol=1e-6)
    # ... and the uploaded adapter is that one.
    uploaded = json.loads(await blobs.get_bytes(f"{job.output_prefix}/adapter/adapter_config.json"))
    assert uploaded["r"] == 32 and uploaded["base_model_name_or_path"] == TINY_CHAT


def test_length_groups_split_only_where_padding_costs_more_than_a_pass() -> None:
    from services.trainer.sft import MICRO_BATCH_OVERHEAD_TOKENS, length_groups

    assert length_groups([100] * 8) == [list(range(8))]  # equal lengths: one pass
    groups = length_groups([50, 400, 60, 380, 55, 200, 52, 390])
    assert sorted(i for g in groups for i in g) == list(range(8))
    assert groups[0] == [0, 6, 4, 2] and groups[-1] == [3, 7, 1]  # short rows apart from long ones
    close = [10, 10 + MICRO_BATCH_OVERHEAD_TOKENS // 2]
    assert len(length_groups(close)) == 1  # padding saved < one pass's overhead


def test_micro_batched_step_gives_the_whole_batchs_gradients(model_store: Path, tmp_path: Path) -> None:
    """A padded step of mixed lengths runs as several micro-batches; its loss and gradients are
    the ones the whole batch in one pass gives."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from services.trainer.data import IGNORE
    from services.trainer.sft import PadCollator, TokenCountingTrainer, length_groups, lora_config

    base_dir = ensure_base_model(TINY_CHAT, store_dir=model_store)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    config = lora_config()
    config.lora_dropout = 0.0  # training mode: the two passes must see the same network
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), config)
    generator = random.Random(3)
    rows = []
    for length in (12, 150, 14, 140, 13, 160):
        ids = [generator.randrange(10, tokenizer.vocab_size) for _ in range(length)]
        rows.append({"input_ids": ids, "labels": [IGNORE] * (length // 2) + ids[length // 2 :]})
    batch = PadCollator(tokenizer.pad_token_id)(rows)
    assert len(length_groups(batch["attention_mask"].sum(-1).tolist())) > 1
    items = int((batch["labels"][:, 1:] != IGNORE).sum())
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])

    def step(trainer_class: type[Trainer]) -> tuple[float, dict[str, torch.Tensor]]:
        model.zero_grad()
        trainer = trainer_class(model=model, args=args)
        loss = trainer.training_step(model, dict(batch), items)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return float(loss), grads

    whole_loss, whole = step(Trainer)
    split_loss, split = step(TokenCountingTrainer)
    assert split_loss == pytest.approx(whole_loss, rel=1e-5)
    assert whole.keys() == split.keys() and whole
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=1e-4, atol=1e-6)


def test_the_padding_free_step_a_gpu_trains_on_gives_the_padded_batchs_loss_and_gradients(
    model_store: Path, tmp_path: Path
) -> None:
    """On a GPU a step's rows are flattened into one sequence with restarting position ids; each row
    must attend only to itself, so the step's loss and gradients are the padded batch's."""
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from services.trainer.data import IGNORE
    from services.trainer.sft import (
        PadCollator,
        Progress,
        flatten_collator,
        lora_config,
        sft_trainer,
        training_arguments,
    )

    base_dir = ensure_base_model(TINY_CHAT, store_dir=model_store)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    config = lora_config()
    config.lora_dropout = 0.0
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), config)
    # A base loads with use_cache on; with a cache transformers builds no packed-sequence mask, so
    # the trainer must turn it off (Trainer sets it from TrainingArguments.use_cache, False).
    assert model.config.use_cache
    generator = random.Random(5)
    rows = []
    for length in (30, 90, 45, 70):
        ids = [generator.randrange(10, tokenizer.vocab_size) for _ in range(length)]
        rows.append({"input_ids": ids, "labels": [IGNORE] * (length // 3) + ids[length // 3 :]})
    args = training_arguments(
        tmp_path, learning_rate=1e-4, epochs=1, batch_size=4, save_steps=10**9, seed=0, bf16=False
    )
    progress = Progress(
        phase="sft",
        on_metrics=lambda data: None,
        on_checkpoint=lambda *a: None,
        control_state=lambda: None,
        tokens_seen=lambda: 0,
        epochs=1,
    )
    trainer = sft_trainer(model, tokenizer, Dataset.from_list(rows), args, progress)
    items = sum(sum(label != IGNORE for label in row["labels"][1:]) for row in rows)

    def step(batch: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
        model.zero_grad()
        loss = trainer.training_step(model, batch, items)
        return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    flat_batch = flatten_collator()(rows)
    assert flat_batch["input_ids"].shape == (1, sum(len(row["input_ids"]) for row in rows))
    flat_loss, flat = step(flat_batch)
    padded_loss, padded = step(PadCollator(tokenizer.pad_token_id)(rows))
    assert flat_loss == pytest.approx(padded_loss, rel=1e-5)
    assert flat.keys() == padded.keys() and flat
    for name in flat:
        torch.testing.assert_close(flat[name], padded[name], rtol=1e-4, atol=1e-6)
