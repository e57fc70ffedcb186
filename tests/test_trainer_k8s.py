"""The Kubernetes backend against the Kubernetes API faked at its HTTP boundary.

The fake (aiohttp) answers the batch/v1 Job calls the official client makes: create, list by
label, read status, delete. Tests flip a Job's status the way the Job controller would.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from urllib.parse import parse_qs

import pytest
from aiohttp import web
from pydantic import ValidationError

from services.common.events import TrainingEvent, TrainingHyperparameters, TrainingRequest
from services.common.kafka import free_port
from services.common.settings import Settings
from services.trainer.k8s import JOB_LABEL, KubernetesTrainer, job_name
from services.trainer.pod import REQUEST_ENV
from tests.conftest import wait_until

NS = "training"


class FakeKubernetes:
    """Jobs kept in a dict; every request recorded as (method, path)."""

    def __init__(self) -> None:
        self.jobs: dict[str, dict] = {}
        self.calls: list[tuple[str, str]] = []
        app = web.Application()
        base = "/apis/batch/v1/namespaces/{ns}/jobs"
        app.router.add_post(base, self.create)
        app.router.add_get(base, self.list)
        app.router.add_get(base + "/{name}", self.read)
        app.router.add_get(base + "/{name}/status", self.read)
        app.router.add_delete(base + "/{name}", self.delete)
        self.app = app

    @staticmethod
    def status(code: int, reason: str, message: str) -> web.Response:
        body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code}
        return web.json_response({**body, "message": message}, status=code)

    async def create(self, request: web.Request) -> web.Response:
        self.calls.append(("POST", request.path))
        job = await request.json()
        name = job["metadata"]["name"]
        if name in self.jobs:
            return self.status(409, "AlreadyExists", f'jobs.batch "{name}" already exists')
        job["metadata"].update(namespace=request.match_info["ns"], uid=f"uid-{name}")
        job["status"] = {"active": 1}
        self.jobs[name] = job
        return web.json_response(job, status=201)

    async def list(self, request: web.Request) -> web.Response:
        self.calls.append(("GET", request.path))
        selector = parse_qs(request.query_string).get("labelSelector", [""])[0]
        wanted = dict(part.split("=", 1) for part in selector.split(",") if part)
        items = [j for j in self.jobs.values() if wanted.items() <= j["metadata"]["labels"].items()]
        return web.json_response(
            {"apiVersion": "batch/v1", "kind": "JobList", "metadata": {}, "items": items}
        )

    async def read(self, request: web.Request) -> web.Response:
        self.calls.append(("GET", request.path))
        job = self.jobs.get(request.match_info["name"])
        if job is None:
            return self.status(404, "NotFound", "not found")
        return web.json_response(job)

    async def delete(self, request: web.Request) -> web.Response:
        self.calls.append(("DELETE", request.path))
        if self.jobs.pop(request.match_info["name"], None) is None:
            return self.status(404, "NotFound", "not found")
        return web.json_response({"kind": "Status", "apiVersion": "v1", "status": "Success"})

    def finish(self, name: str, condition: str, reason: str = "", message: str = "") -> None:
        self.jobs[name]["status"] = {
            "conditions": [{"type": condition, "status": "True", "reason": reason, "message": message}],
            **({"succeeded": 1} if condition == "Complete" else {"failed": 3}),
        }


@pytest.fixture
async def fake_k8s() -> AsyncIterator[tuple[FakeKubernetes, str]]:
    fake = FakeKubernetes()
    runner = web.AppRunner(fake.app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield fake, f"http://127.0.0.1:{port}"
    await runner.cleanup()


def settings_for(url: str) -> Settings:
    return Settings(
        trainer_backend="kubernetes",
        trainer_k8s_api_url=url,
        trainer_k8s_namespace=NS,
        trainer_k8s_image="registry.example/distillery:1.2.3",
        trainer_k8s_service_account="distillery-trainer-job",
        trainer_k8s_gpus=1,
        trainer_k8s_cpu="8",
        trainer_k8s_memory="64Gi",
        trainer_k8s_node_selector={"nvidia.com/gpu.present": "true"},
        trainer_k8s_tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        trainer_k8s_model_store_claim="distillery-model-store",
        trainer_k8s_env_secret="distillery-trainer-env",
        trainer_k8s_poll_seconds=0.1,
    )


def request(action: str = "start", job_id: str = "ftjob-Abc123") -> TrainingRequest:
    return TrainingRequest(
        request_id=f"{job_id}:{action}",
        action=action,  # type: ignore[arg-type]
        job_id=job_id,
        project_id="proj_1",
        model_slug="my-model",
        base_model="meta-llama/Llama-3.1-8B-Instruct",
        snapshot_uri="snapshots/ds_1/abc.jsonl",
        hyperparameters=TrainingHyperparameters(num_epochs=2),
        output_prefix="fine-tunes/proj_1/my-model/ftjob-Abc123",
    )


class Published:
    def __init__(self) -> None:
        self.events: list[TrainingEvent] = []

    async def __call__(self, event: TrainingEvent) -> None:
        self.events.append(event)

    def statuses(self) -> list[str | None]:
        return [e.status for e in self.events]


async def test_a_start_creates_one_gpu_job_from_the_template(fake_k8s) -> None:
    fake, url = fake_k8s
    published = Published()
    trainer = KubernetesTrainer(settings_for(url), published)
    await trainer.start()
    try:
        await trainer.handle(request())
        await trainer.handle(request())  # redelivered: the Job exists, nothing new
        assert list(fake.jobs) == [job_name("ftjob-Abc123", 0)]
        assert len(job_name("x" * 200, 12)) <= 63
        job = fake.jobs[job_name("ftjob-Abc123", 0)]
        pod = job["spec"]["template"]["spec"]
        container = pod["containers"][0]
        assert container["image"] == "registry.example/distillery:1.2.3"
        assert container["command"] == ["python", "-m", "services.trainer.pod"]
        assert container["resources"]["limits"] == {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": "1"}
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        assert pod["serviceAccountName"] == "distillery-trainer-job" and pod["restartPolicy"] == "Never"
        assert pod["volumes"][0]["persistentVolumeClaim"] == {"claimName": "distillery-model-store"}
        assert container["volumeMounts"] == [{"name": "model-store", "mountPath": "/models"}]
        assert container["envFrom"] == [{"secretRef": {"name": "distillery-trainer-env"}}]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert TrainingRequest.model_validate_json(env[REQUEST_ENV]) == request()
        assert job["metadata"]["labels"][JOB_LABEL] == "ftjob-Abc123"
        assert job["spec"]["backoffLimit"] == 2
        assert published.statuses() == ["queued"]
        assert published.events[0].event_id == f"ftjob-Abc123:{published.events[0].seq}"

        fake.finish(
            job_name("ftjob-Abc123", 0), "Failed", "BackoffLimitExceeded", "Job has reached the backoff limit"
        )
        await wait_until(lambda: len(published.events) == 2, timeout=10, what="failure report")
        failed = published.events[-1]
        assert failed.status == "failed" and failed.error_code == "trainer_crashed"
        assert "BackoffLimitExceeded" in failed.message and failed.seq > published.events[0].seq
    finally:
        await trainer.stop()


async def test_a_restarted_trainer_follows_the_jobs_in_flight(fake_k8s) -> None:
    fake, url = fake_k8s
    first = KubernetesTrainer(settings_for(url), Published())
    await first.start()
    await first.handle(request(job_id="ftjob-1"))
    await first.handle(request(job_id="ftjob-2"))
    fake.finish(job_name("ftjob-2", 0), "Complete")
    await wait_until(
        lambda: job_name("ftjob-2", 0) not in first.following, timeout=10, what="done job let go"
    )
    await first.stop()

    published = Published()
    second = KubernetesTrainer(settings_for(url), published)
    await second.start()
    try:
        assert set(second.following) == {job_name("ftjob-1", 0)}  # the finished one is not followed
        assert ("GET", f"/apis/batch/v1/namespaces/{NS}/jobs") in fake.calls
        fake.finish(job_name("ftjob-1", 0), "Complete")  # the pod reported success itself
        await wait_until(lambda: not second.following, timeout=10, what="follower done")
        assert published.events == []
    finally:
        await second.stop()


async def test_pause_resume_and_cancel_delete_and_recreate_the_job(fake_k8s) -> None:
    fake, url = fake_k8s
    published = Published()
    trainer = KubernetesTrainer(settings_for(url), published)
    await trainer.start()
    try:
        await trainer.handle(request())
        await trainer.handle(request("pause"))
        assert fake.jobs == {}
        assert ("DELETE", f"/apis/batch/v1/namespaces/{NS}/jobs/{job_name('ftjob-Abc123', 0)}") in fake.calls
        await trainer.handle(request("resume"))
        assert list(fake.jobs) == [job_name("ftjob-Abc123", 1)]
        await trainer.handle(request("resume"))  # already running: nothing new
        assert list(fake.jobs) == [job_name("ftjob-Abc123", 1)]
        await trainer.handle(request("cancel"))
        assert fake.jobs == {}
        assert published.statuses() == ["queued", "paused", "queued", "cancelled"]
        seqs = [e.seq for e in published.events]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        await asyncio.sleep(0.3)  # followers of deleted Jobs end quietly
        assert published.statuses() == ["queued", "paused", "queued", "cancelled"]
        assert not trainer.following
    finally:
        await trainer.stop()


async def test_unreachable_api_fails_loudly(fake_k8s) -> None:
    trainer = KubernetesTrainer(settings_for(f"http://127.0.0.1:{free_port()}"), Published())
    with pytest.raises(Exception):  # noqa: B017 - urllib3's connection error, whatever its class
        await asyncio.wait_for(trainer.start(), 60)


async def test_the_pod_reports_its_run_on_kafka_with_clock_sequence_numbers(tansu, tmp_path) -> None:
    from services.common.events import TRAINING_EVENTS_TOPIC
    from services.common.kafka import ensure_topics
    from services.trainer.pod import train
    from tests.helpers import read_topic

    await ensure_topics(tansu.url)
    settings = Settings(
        kafka_url=tansu.url,
        blob_url=f"file://{tmp_path / 'blobs'}",
        trainer_work_dir=tmp_path / "runs",
        model_store_dir=tmp_path / "cache",
    )
    job = request(job_id="ftjob-pod-1").model_copy(update={"snapshot_uri": "snapshots/missing.jsonl"})
    assert await train(job, settings) == "failed"
    # The topic is the session broker's, shared by every test, and some (tests/test_models_api.py)
    # publish poison there to test the api's DLQ: only records that are training events count.
    events = []
    for value in await read_topic(tansu.url, TRAINING_EVENTS_TOPIC):
        with contextlib.suppress(ValidationError):
            events.append(TrainingEvent.model_validate_json(value))
    mine = [e for e in events if e.job_id == "ftjob-pod-1"]
    assert [e.status for e in mine] == ["running", "failed"]
    assert mine[0].seq > 1_700_000_000_000_000 and mine[1].seq > mine[0].seq  # µs clock, after the service's
    assert mine[1].error_code == "missing_input"
    assert (
        tmp_path / "runs" / "jobs" / "ftjob-pod-1" / "events.jsonl"
    ).exists()  # on the volume: a retry resumes
