"""``trainingConfig.provider: "openai"``: train through OpenAI's fine-tuning API with the project's key.

The api runs these jobs itself (no GPU involved): upload the snapshot's TRAIN rows as a JSONL file,
create the upstream job, poll it, and mirror its status and events. Everything it learns is
published on ``training.events.v1`` like a trainer would, so one consumer applies it (once per
``seq``). A succeeded job carries ``data.upstream_model`` (the ``ft:`` model the router calls).

``upstream_job_id`` is stored as soon as OpenAI answers, and every non-finished OpenAI job is
picked up again when the api starts (``resume_all``): a restart never loses or duplicates one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import httpx
import orjson
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from services.api.fine_tuning.models import TrainingJob
from services.api.fine_tuning.schemas import TERMINAL_JOB_STATUSES
from services.api.fine_tuning.service import lock_job
from services.api.providers.models import ProviderKeys
from services.common.errors import bad_request
from services.common.events import TRAINING_EVENTS_TOPIC, TrainingEvent
from services.common.secrets import SecretError, decrypt_secret

log = logging.getLogger(__name__)

POLL_SECONDS = 5.0
UPSTREAM_STATUS = {
    "validating_files": "queued",
    "queued": "queued",
    "running": "running",
    "succeeded": "succeeded",
    "failed": "failed",
    "cancelled": "cancelled",
}


async def project_key(state: Any, *, session: AsyncSession, project_id: str) -> str | None:
    row = await session.get(ProviderKeys, project_id)
    if row is None or row.openai_key_enc is None:
        return None
    try:
        return decrypt_secret(row.openai_key_enc, state.secret_key)
    except SecretError:
        return None


async def require_key(state: Any, *, session: AsyncSession, project_id: str) -> None:
    if await project_key(state, session=session, project_id=project_id) is None:
        raise bad_request(
            "Training on an OpenAI base model uses the project's OpenAI key, and this project has none: "
            'set it with PUT /provider-keys {"openai": "sk-..."}.',
            param="trainingConfig.provider",
        )


def launch(state: Any, job_id: str) -> None:
    """Run (or keep following) one OpenAI job in the background."""
    tasks: set[asyncio.Task] | None = getattr(state, "openai_fine_tunes", None)
    if tasks is None:
        tasks = state.openai_fine_tunes = set()
    task = asyncio.create_task(_run_logged(state, job_id), name=f"openai-fine-tune-{job_id}")
    tasks.add(task)
    task.add_done_callback(tasks.discard)


async def resume_all(state: Any) -> int:
    async with state.sessions() as session:
        ids = list(
            await session.scalars(
                select(TrainingJob.id).where(
                    TrainingJob.provider == "openai", TrainingJob.status.not_in(TERMINAL_JOB_STATUSES)
                )
            )
        )
    for job_id in ids:
        launch(state, job_id)
    return len(ids)


async def stop_all(state: Any) -> None:
    tasks: set[asyncio.Task] = getattr(state, "openai_fine_tunes", None) or set()
    for task in list(tasks):
        task.cancel()
    for task in list(tasks):
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


async def _run_logged(state: Any, job_id: str) -> None:
    """Follow one job; OpenAI unreachable is retried with backoff, anything else stops until a restart."""
    run, delay = OpenAIRun(state, job_id), POLL_SECONDS
    while True:
        try:
            await run.run()
            return
        except asyncio.CancelledError:
            raise
        except httpx.TransportError as exc:
            log.warning(
                "OpenAI unreachable for fine-tune %s (%s); retrying in %.0fs",
                job_id,
                type(exc).__name__,
                delay,
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 60.0)
        except Exception:
            log.exception("OpenAI fine-tune %s stopped; it resumes when the api restarts", job_id)
            return


def openai_line(line: dict[str, Any], preference: bool) -> dict[str, Any] | None:
    """One snapshot row in OpenAI's training format (None: not usable for this method / split)."""
    if line.get("split", "TRAIN") != "TRAIN":
        return None
    messages = line["messages"]
    if preference:
        if not line.get("rejected_message"):
            return None
        row: dict[str, Any] = {
            "input": {"messages": messages[:-1]},
            "preferred_output": [messages[-1]],
            "non_preferred_output": [line["rejected_message"]],
        }
        if line.get("tools"):
            row["input"]["tools"] = line["tools"]
        return row
    row = {"messages": messages}
    if line.get("tools"):
        row["tools"] = line["tools"]
    return row


class OpenAIRun:
    def __init__(self, state: Any, job_id: str) -> None:
        self.state = state
        self.job_id = job_id
        self.seq = 0
        self.seen_events: set[str] = set()

    def next_seq(self) -> int:
        # Microseconds: later than anything sent before a restart, without reading the topic back.
        self.seq = max(self.seq + 1, time.time_ns() // 1000)
        return self.seq

    async def publish(self, job: TrainingJob, type: str, **fields: Any) -> None:
        seq = self.next_seq()
        event = TrainingEvent(
            event_id=f"{job.id}:openai:{seq}",
            job_id=job.id,
            project_id=job.project_id,
            seq=seq,
            created_at=fields.pop("created_at", int(time.time())),
            type=type,  # type: ignore[arg-type]
            **fields,
        )
        await self.state.broker.publish(
            event.model_dump(mode="json"), TRAINING_EVENTS_TOPIC, key=job.id.encode()
        )

    async def load(self) -> tuple[TrainingJob, str | None]:
        async with self.state.sessions() as session:
            job = await session.get(TrainingJob, self.job_id)
            key = await project_key(self.state, session=session, project_id=job.project_id) if job else None
        return job, key

    async def run(self) -> None:
        job, key = await self.load()
        if job is None or job.status in TERMINAL_JOB_STATUSES:
            return
        if key is None:
            await self.publish(
                job,
                "status",
                status="failed",
                level="error",
                error_code="missing_openai_key",
                message="The project's OpenAI key was removed; set it (PUT /provider-keys) and train again.",
            )
            return
        base = self.state.settings.openai_base_url.rstrip("/")
        async with httpx.AsyncClient(
            base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=60
        ) as http:
            if job.upstream_job_id is None:
                upstream = await self.create_upstream(http, job)
                if upstream is None:
                    return
            await self.follow(http)

    async def create_upstream(self, http: httpx.AsyncClient, job: TrainingJob) -> str | None:
        preference = job.method.get("type") == "dpo"
        rows = []
        for raw in (await self.state.blobs.get_bytes(job.snapshot_uri)).splitlines():
            if raw.strip() and (row := openai_line(orjson.loads(raw), preference)) is not None:
                rows.append(orjson.dumps(row))
        upload = await http.post(
            "/files",
            data={"purpose": "fine-tune"},
            files={"file": (f"{job.id}.jsonl", b"\n".join(rows) + b"\n", "application/jsonl")},
        )
        if upload.status_code >= 400:
            return await self.fail(
                job, "upstream_file_rejected", f"OpenAI refused the training file: {_why(upload)}"
            )
        body: dict[str, Any] = {
            "model": job.base_model,
            "training_file": upload.json()["id"],
            "seed": job.seed,
            "method": _upstream_method(job.method),
            "metadata": {"distillery_job": job.id},
        }
        if job.suffix:
            body["suffix"] = job.suffix[:18]
        created = await http.post("/fine_tuning/jobs", json=body)
        if created.status_code >= 400:
            return await self.fail(
                job, "upstream_job_rejected", f"OpenAI refused the fine-tuning job: {_why(created)}"
            )
        upstream_id = created.json()["id"]
        async with self.state.sessions.begin() as session:
            row = await lock_job(session, job.id)
            row.upstream_job_id = upstream_id
        await self.publish(job, "message", message=f"Created OpenAI fine-tuning job {upstream_id}.")
        return upstream_id

    async def fail(self, job: TrainingJob, code: str, message: str) -> None:
        await self.publish(job, "status", status="failed", level="error", error_code=code, message=message)
        return None

    async def follow(self, http: httpx.AsyncClient) -> None:
        last_status = None
        while True:
            job, _ = await self.load()
            if job is None:
                return
            if job.status == "cancelled":
                await http.post(f"/fine_tuning/jobs/{job.upstream_job_id}/cancel")
                return
            upstream = await http.get(f"/fine_tuning/jobs/{job.upstream_job_id}")
            if upstream.status_code >= 500 or upstream.status_code == 429:
                await asyncio.sleep(POLL_SECONDS)
                continue
            if upstream.status_code >= 400:
                await self.fail(job, "upstream_job_lost", f"OpenAI cannot find the job: {_why(upstream)}")
                return
            state = upstream.json()
            await self.mirror_events(http, job)
            status = UPSTREAM_STATUS.get(state.get("status"), "running")
            if status in TERMINAL_JOB_STATUSES:
                await self.finish(job, state, status)
                return
            if status != last_status:
                await self.publish(job, "status", status=status)
                last_status = status
            await asyncio.sleep(POLL_SECONDS)

    async def mirror_events(self, http: httpx.AsyncClient, job: TrainingJob) -> None:
        answer = await http.get(f"/fine_tuning/jobs/{job.upstream_job_id}/events", params={"limit": 100})
        if answer.status_code >= 400:
            return
        for item in reversed(answer.json().get("data", [])):  # OpenAI lists newest first
            if item["id"] in self.seen_events:
                continue
            self.seen_events.add(item["id"])
            data = item.get("data") or {}
            kind = "metrics" if item.get("type") == "metrics" else "message"
            await self.publish(
                job,
                kind,
                message=item.get("message", ""),
                level=item.get("level", "info"),
                data=data if isinstance(data, dict) else {},
                created_at=item.get("created_at") or int(time.time()),
            )

    async def finish(self, job: TrainingJob, state: dict[str, Any], status: str) -> None:
        if status == "succeeded":
            await self.publish(
                job,
                "status",
                status="succeeded",
                trained_tokens=state.get("trained_tokens"),
                message=f"OpenAI fine-tuning finished: {state.get('fine_tuned_model')}.",
                data={
                    "upstream_model": state.get("fine_tuned_model"),
                    "upstream_job_id": job.upstream_job_id,
                },
            )
        elif status == "failed":
            error = state.get("error") or {}
            await self.publish(
                job,
                "status",
                status="failed",
                level="error",
                error_code=error.get("code") or "upstream_failed",
                message=f"OpenAI fine-tuning failed: {error.get('message') or 'no reason given'}",
            )
        else:
            await self.publish(
                job, "status", status="cancelled", message="OpenAI cancelled the fine-tuning job."
            )


def _upstream_method(method: dict[str, Any]) -> dict[str, Any]:
    """Our stored method for OpenAI: numbers as given, ``auto`` where we chose nothing."""
    kind = "dpo" if method.get("type") == "dpo" else "supervised"
    hyper = dict((method.get(kind) or {}).get("hyperparameters") or {})
    if kind == "supervised":
        hyper.pop("beta", None)
    return {"type": kind, kind: {"hyperparameters": hyper}}


def _why(response: httpx.Response) -> str:
    try:
        return str(response.json().get("error", {}).get("message") or response.status_code)
    except ValueError:
        return f"HTTP {response.status_code}"
