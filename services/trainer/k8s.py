"""The Kubernetes backend: one Job per training run, followed to completion with the official client.

``DISTILLERY_TRAINER_BACKEND=kubernetes``. Each start (and each resume after a pause) creates a
Job named after the training job (``train-<job id>-<generation>``), labelled with the job id and
carrying the request, so a restarted trainer finds the runs in flight by listing Jobs: Kubernetes
is the durable state. A second start for the same job hits the existing name (409) and is
ignored, so a job never runs twice at once. The pod (``services.trainer.pod``) trains on the GPU
node and reports its own progress on ``training.events.v1``; this side reports what the pod
cannot: queued, paused, cancelled (it deletes the Job) and a Job that failed without a report.

The Job template comes from settings (the Helm chart's values): image, resources with
``nvidia.com/gpu``, node selector, tolerations, the model-store volume claim (mounted at
``/models``: base model cache and run folders, so a retried pod resumes from its checkpoint),
the service account and the Secret holding the ``DISTILLERY_*`` URLs.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from services.common.events import TrainingEvent, TrainingRequest
from services.common.settings import Settings
from services.trainer.job import clock_seq
from services.trainer.pod import REQUEST_ENV

log = logging.getLogger(__name__)

APP_LABEL = "app.kubernetes.io/name"
APP = "distillery-trainer"
JOB_LABEL = "distillery.dev/training-job"
GENERATION_LABEL = "distillery.dev/generation"
MODEL_STORE_MOUNT = "/models"
Publish = Callable[[TrainingEvent], Awaitable[None]]


def job_name(job_id: str, generation: int) -> str:
    """A DNS-1123 name for one Job of ``job_id`` (at most 63 characters, unique per id)."""
    slug = re.sub(r"[^a-z0-9-]+", "-", job_id.lower()).strip("-")[:40] or "job"
    digest = hashlib.sha256(job_id.encode()).hexdigest()[:6]
    return f"train-{slug}-{digest}-{generation}"


def label_value(job_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", job_id)[:63].strip("-_.") or "job"


def job_manifest(settings: Settings, request: TrainingRequest, generation: int) -> k8s.V1Job:
    """The Job for one run of ``request``, from the settings' template."""
    labels = {APP_LABEL: APP, JOB_LABEL: label_value(request.job_id), GENERATION_LABEL: str(generation)}
    limits = {"cpu": settings.trainer_k8s_cpu, "memory": settings.trainer_k8s_memory}
    if settings.trainer_k8s_gpus:
        limits["nvidia.com/gpu"] = str(settings.trainer_k8s_gpus)
    env = [
        k8s.V1EnvVar(name=REQUEST_ENV, value=request.model_dump_json()),
        k8s.V1EnvVar(name="DISTILLERY_MODEL_STORE_DIR", value=f"{MODEL_STORE_MOUNT}/cache"),
        k8s.V1EnvVar(name="DISTILLERY_TRAINER_WORK_DIR", value=f"{MODEL_STORE_MOUNT}/runs"),
        k8s.V1EnvVar(name="HF_HUB_OFFLINE", value="1"),
    ]
    env_from = (
        [k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=settings.trainer_k8s_env_secret))]
        if settings.trainer_k8s_env_secret
        else None
    )
    volume = (
        k8s.V1Volume(
            name="model-store",
            persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(
                claim_name=settings.trainer_k8s_model_store_claim
            ),
        )
        if settings.trainer_k8s_model_store_claim
        else k8s.V1Volume(name="model-store", empty_dir=k8s.V1EmptyDirVolumeSource())
    )
    container = k8s.V1Container(
        name="trainer",
        image=settings.trainer_k8s_image,
        command=["python", "-m", "services.trainer.pod"],
        env=env,
        env_from=env_from,
        resources=k8s.V1ResourceRequirements(limits=limits, requests=dict(limits)),
        volume_mounts=[k8s.V1VolumeMount(name="model-store", mount_path=MODEL_STORE_MOUNT)],
    )
    tolerations = [k8s.V1Toleration(**_snake(t)) for t in settings.trainer_k8s_tolerations] or None
    pod = k8s.V1PodSpec(
        restart_policy="Never",
        containers=[container],
        volumes=[volume],
        node_selector=settings.trainer_k8s_node_selector or None,
        tolerations=tolerations,
        service_account_name=settings.trainer_k8s_service_account or None,
        automount_service_account_token=bool(settings.trainer_k8s_service_account),
    )
    return k8s.V1Job(
        api_version="batch/v1",
        kind="Job",
        metadata=k8s.V1ObjectMeta(name=job_name(request.job_id, generation), labels=labels),
        spec=k8s.V1JobSpec(
            backoff_limit=2,  # a crashed pod is retried and resumes from the checkpoint on the volume
            ttl_seconds_after_finished=7 * 24 * 3600,
            template=k8s.V1PodTemplateSpec(metadata=k8s.V1ObjectMeta(labels=labels), spec=pod),
        ),
    )


def _snake(toleration: dict[str, Any]) -> dict[str, Any]:
    """Chart values use the Kubernetes spelling (``tolerationSeconds``); the client wants snake case."""
    return {re.sub(r"(?<!^)(?=[A-Z])", "_", k).lower(): v for k, v in toleration.items()}


def api_client(settings: Settings) -> k8s.ApiClient:
    """The in-cluster service account, or ``trainer_k8s_api_url`` (tests, out-of-cluster)."""
    if settings.trainer_k8s_api_url:
        configuration = k8s.Configuration(host=settings.trainer_k8s_api_url)
        return k8s.ApiClient(configuration)
    from kubernetes import config

    config.load_incluster_config()
    return k8s.ApiClient()


def _finished(job: k8s.V1Job) -> str | None:
    """``succeeded``/``failed`` once the Job is over (with the reason when failed), else None."""
    for condition in (job.status and job.status.conditions) or []:
        if condition.status == "True" and condition.type == "Complete":
            return "succeeded"
        if condition.status == "True" and condition.type == "Failed":
            return f"failed: {condition.reason or 'Failed'}: {condition.message or ''}".rstrip(": ")
    if job.status and job.status.succeeded:
        return "succeeded"
    return None


class KubernetesTrainer:
    """Training requests → Kubernetes Jobs, followed until they finish."""

    def __init__(self, settings: Settings, publish: Publish, *, api: k8s.ApiClient | None = None) -> None:
        self.settings = settings
        self.publish = publish
        self.namespace = settings.trainer_k8s_namespace
        self._client = api
        self.batch: k8s.BatchV1Api | None = None
        self.following: dict[str, asyncio.Task] = {}  # Job name → follower
        self.requests: dict[str, TrainingRequest] = {}  # Job name → its request

    async def start(self) -> None:
        """Follow the runs a previous trainer left in flight."""
        self._client = self._client or await asyncio.to_thread(api_client, self.settings)
        self.batch = k8s.BatchV1Api(self._client)
        jobs = await self._call(
            self.batch.list_namespaced_job, self.namespace, label_selector=f"{APP_LABEL}={APP}"
        )
        for job in jobs.items:
            env = {e.name: e.value for e in job.spec.template.spec.containers[0].env or []}
            if _finished(job) is None and REQUEST_ENV in env and job.metadata.deletion_timestamp is None:
                request = TrainingRequest.model_validate_json(env[REQUEST_ENV])
                self._follow(job.metadata.name, request)
                log.info(
                    "following training Job %s (job %s) after a restart", job.metadata.name, request.job_id
                )

    async def stop(self) -> None:
        for task in self.following.values():
            task.cancel()
        for task in list(self.following.values()):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._client is not None:
            await asyncio.to_thread(self._client.close)

    async def handle(self, request: TrainingRequest) -> None:
        if request.action == "start":
            await self._launch(request, generation=0, message="Queued: created Kubernetes Job {name}.")
        elif request.action in ("cancel", "pause"):
            deleted = await self._delete_all(request.job_id)
            if not deleted and request.action == "pause":
                return
            if request.action == "cancel":
                await self._report(request, "status", "Training cancelled.", status="cancelled")
            else:
                await self._report(
                    request,
                    "status",
                    "Training paused; resume continues from the last checkpoint.",
                    status="paused",
                )
        elif request.action == "resume":
            active = [j for j in await self._jobs_of(request.job_id) if _finished(j) is None]
            if active:
                return  # still running (a pause that never took effect)
            generation = 1 + max(
                (
                    int(j.metadata.labels.get(GENERATION_LABEL, 0))
                    for j in await self._jobs_of(request.job_id)
                ),
                default=0,
            )
            await self._launch(
                request, generation=generation, message="Resumed: created Kubernetes Job {name}."
            )

    async def _launch(self, request: TrainingRequest, *, generation: int, message: str) -> None:
        manifest = job_manifest(self.settings, request, generation)
        name = manifest.metadata.name
        try:
            await self._call(self.batch.create_namespaced_job, self.namespace, manifest)
        except ApiException as exc:
            if exc.status != 409:
                raise
            log.info("training Job %s already exists; duplicate %s ignored", name, request.action)
            return
        await self._report(request, "status", message.format(name=name), status="queued")
        self._follow(name, request)

    def _follow(self, name: str, request: TrainingRequest) -> None:
        if name not in self.following:
            self.requests[name] = request
            self.following[name] = asyncio.create_task(self._watch(name, request), name=f"follow-{name}")

    async def _watch(self, name: str, request: TrainingRequest) -> None:
        """Poll the Job until it ends; report a failure the pod could not report itself."""
        try:
            while True:
                try:
                    job = await self._call(self.batch.read_namespaced_job_status, name, self.namespace)
                except ApiException as exc:
                    if exc.status == 404:
                        return  # deleted: by our cancel/pause (reported there) or its TTL
                    log.warning("reading training Job %s failed: %s", name, exc.status)
                    await asyncio.sleep(self.settings.trainer_k8s_poll_seconds)
                    continue
                outcome = _finished(job)
                if outcome == "succeeded":
                    return
                if outcome is not None:
                    await self._report(
                        request,
                        "status",
                        f"Training failed: Kubernetes Job {name} {outcome}. The pod ended without a report "
                        "(out of memory, evicted or crashed); its checkpoints are kept.",
                        status="failed",
                        level="error",
                        error_code="trainer_crashed",
                    )
                    return
                await asyncio.sleep(self.settings.trainer_k8s_poll_seconds)
        finally:
            self.following.pop(name, None)
            self.requests.pop(name, None)

    async def _jobs_of(self, job_id: str) -> list[k8s.V1Job]:
        jobs = await self._call(
            self.batch.list_namespaced_job,
            self.namespace,
            label_selector=f"{APP_LABEL}={APP},{JOB_LABEL}={label_value(job_id)}",
        )
        return list(jobs.items)

    async def _delete_all(self, job_id: str) -> int:
        deleted = 0
        for job in await self._jobs_of(job_id):
            name = job.metadata.name
            task = self.following.pop(name, None)
            if task:
                task.cancel()
            if _finished(job) is not None:
                continue
            with contextlib.suppress(ApiException):
                await self._call(
                    self.batch.delete_namespaced_job, name, self.namespace, propagation_policy="Background"
                )
                deleted += 1
        return deleted

    async def _report(self, request: TrainingRequest, type: str, message: str, **fields: Any) -> None:
        seq = clock_seq()
        await self.publish(
            TrainingEvent(
                event_id=f"{request.job_id}:{seq}",
                job_id=request.job_id,
                project_id=request.project_id,
                seq=seq,
                created_at=int(time.time()),
                type=type,  # type: ignore[arg-type]
                message=message,
                **fields,
            )
        )

    async def _call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(method, *args, **kwargs)
