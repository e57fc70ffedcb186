"""The local backend: training runs in child processes of the trainer service, one at a time.

Each job has a folder ``<trainer_work_dir>/jobs/<job_id>/`` holding the request, ``state.json``
(status, attempts, how many event lines were relayed), ``events.jsonl`` (written by the run, see
``services.trainer.job``, and by this service while no run is alive) and the run's checkpoints.
The folder is written before the request is acknowledged, so an acknowledged request is never lost:
after a restart, queued jobs are queued again and a job that was running resumes from its last
checkpoint (or fails clearly once it has died ``max_attempts`` times). Events are relayed to
``training.events.v1`` with ``event_id = <job id>:<line number>``, so relaying a line twice
produces the same event and the api applies it once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from services.common.children import die_with_parent
from services.common.events import TrainingEvent, TrainingRequest
from services.common.settings import Settings
from services.trainer.job import CONTROL_FILE, EVENTS_FILE, REQUEST_FILE, EventLog, read_events

log = logging.getLogger(__name__)

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
STATE_FILE = "state.json"
RELAY_INTERVAL = 0.5

Publish = Callable[[TrainingEvent], Awaitable[None]]


def training_event(
    request: TrainingRequest | dict[str, Any], seq: int, line: dict[str, Any]
) -> TrainingEvent:
    """The Kafka event for line ``seq`` of a job's ``events.jsonl``."""
    job_id = request["job_id"] if isinstance(request, dict) else request.job_id
    project_id = request["project_id"] if isinstance(request, dict) else request.project_id
    seq = int(line.get("seq", seq))
    return TrainingEvent(
        event_id=f"{job_id}:{seq}",
        job_id=job_id,
        project_id=project_id,
        seq=seq,
        created_at=int(line.get("created_at") or 0),
        type=line["type"],
        level=line.get("level", "info"),
        message=line.get("message", ""),
        status=line.get("status"),
        data=line.get("data") or {},
        artifact_uri=line.get("artifact_uri"),
        trained_tokens=line.get("trained_tokens"),
        error_code=line.get("error_code"),
    )


class JobFolder:
    """One job's folder: request, state and event log."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.events = EventLog(path / EVENTS_FILE)

    @property
    def job_id(self) -> str:
        return self.path.name

    def request(self) -> TrainingRequest:
        return TrainingRequest.model_validate_json((self.path / REQUEST_FILE).read_bytes())

    def state(self) -> dict[str, Any]:
        try:
            return json.loads((self.path / STATE_FILE).read_text())
        except FileNotFoundError:
            return {"status": "queued", "attempts": 0, "relayed": 0}

    def save_state(self, **changes: Any) -> dict[str, Any]:
        state = {**self.state(), **changes}
        tmp = self.path / f".{STATE_FILE}.tmp"
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.path / STATE_FILE)
        return state

    def set_control(self, value: str | None) -> None:
        path = self.path / CONTROL_FILE
        if value is None:
            path.unlink(missing_ok=True)
        else:
            path.write_text(value)

    def control(self) -> str | None:
        try:
            return (self.path / CONTROL_FILE).read_text().strip() or None
        except FileNotFoundError:
            return None

    def drop_checkpoints(self) -> None:
        """Remove the run's local training folders (checkpoints with optimizer state are large)."""
        for name in ("sft", "dpo", "final", "parent_adapter"):
            shutil.rmtree(self.path / name, ignore_errors=True)

    def last_status(self) -> str | None:
        statuses = [e["status"] for e in read_events(self.path / EVENTS_FILE) if e.get("status")]
        return statuses[-1] if statuses else None


class LocalTrainer:
    """Receives training requests, runs them one at a time in child processes, relays their events."""

    def __init__(
        self,
        settings: Settings,
        publish: Publish,
        *,
        max_attempts: int = 2,
        child_env: dict[str, str] | None = None,
    ) -> None:
        self.settings = settings
        self.publish = publish
        self.max_attempts = max_attempts
        self.root = settings.resolved_trainer_work_dir() / "jobs"
        self.child_env = child_env or {}
        self.queue: asyncio.Queue[str] = asyncio.Queue()
        self.children: dict[str, asyncio.subprocess.Process] = {}
        # The job the worker holds, from taking it off the queue until its outcome is recorded:
        # longer than its child lives, so a pause or cancel never falls between the two.
        self.current: str | None = None
        self._worker: asyncio.Task | None = None
        self._relay_lock = asyncio.Lock()

    def folder(self, job_id: str) -> JobFolder:
        if not job_id or "/" in job_id or job_id.startswith("."):
            raise ValueError(f"invalid job id {job_id!r}")
        return JobFolder(self.root / job_id)

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Pick up where the last process left off, then start the worker."""
        self.root.mkdir(parents=True, exist_ok=True)
        for path in sorted(p for p in self.root.iterdir() if p.is_dir()):
            job = JobFolder(path)
            if not (path / REQUEST_FILE).exists():
                continue
            await self.relay(job)
            state = job.state()
            if state["status"] == "running":
                # This process died while the run was alive (the run dies with it).
                await self._crashed(job, "the trainer service restarted")
            elif state["status"] == "queued":
                self.queue.put_nowait(job.job_id)
        self._worker = asyncio.create_task(self._work(), name="trainer-worker")

    async def stop(self) -> None:
        """Stop the runs in flight; they resume from their last checkpoint when the trainer starts again."""
        children = dict(self.children)
        for process in children.values():
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
        if self._worker:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        for job_id, process in children.items():
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                kill_child(process)
            job = self.folder(job_id)
            status = job.last_status()
            if status in TERMINAL or status == "paused":
                await self._settle(job, status)
                continue
            # A deliberate stop is not a failed attempt: the job is simply queued again.
            job.save_state(status="queued")
            job.events.emit(
                "message",
                "The trainer stopped; the run resumes from its last checkpoint when it starts again.",
                level="warn",
            )
            await self._relay_quietly(job)

    # --- requests --------------------------------------------------------------------------

    async def handle(self, request: TrainingRequest) -> None:
        """Apply one request durably (the caller acknowledges it after this returns)."""
        job = self.folder(request.job_id)
        if request.action == "start":
            await self._start(job, request)
            return
        if not (job.path / REQUEST_FILE).exists():
            log.warning("%s for unknown training job %s ignored", request.action, request.job_id)
            return
        status = job.state()["status"]
        if status in TERMINAL:
            log.info("%s for finished job %s (%s) ignored", request.action, request.job_id, status)
            return
        if request.action == "cancel":
            await self._cancel(job, status)
        elif request.action == "pause":
            await self._pause(job, status)
        elif request.action == "resume":
            await self._resume(job, status)

    async def _start(self, job: JobFolder, request: TrainingRequest) -> None:
        if (job.path / REQUEST_FILE).exists():
            log.info("training job %s already known; duplicate start ignored", request.job_id)
            return
        job.path.mkdir(parents=True, exist_ok=True)
        tmp = job.path / f".{REQUEST_FILE}.tmp"
        tmp.write_text(request.model_dump_json())
        job.save_state(status="queued", attempts=0, relayed=0)
        os.replace(tmp, job.path / REQUEST_FILE)
        job.events.emit("status", "Queued for training.", status="queued")
        await self.relay(job)
        self.queue.put_nowait(job.job_id)

    async def _cancel(self, job: JobFolder, status: str) -> None:
        if job.job_id == self.current:
            job.set_control("cancel")  # the run stops after its current step and reports
            return
        job.save_state(status="cancelled")
        job.events.emit("status", "Training cancelled.", status="cancelled")
        await self.relay(job)

    async def _pause(self, job: JobFolder, status: str) -> None:
        if job.job_id == self.current:
            job.set_control("pause")  # the run saves a checkpoint, stops and reports
            job.save_state(resume_pending=False)
            return
        if status == "queued":
            job.save_state(status="paused")
            job.events.emit("status", "Training paused before it started.", status="paused")
            await self.relay(job)

    async def _resume(self, job: JobFolder, status: str) -> None:
        if status != "paused":
            if job.job_id == self.current:
                # The pause may already be taken (the run is reporting it and ending): resume
                # once it has ended. If not taken yet, withdrawing it is enough.
                job.set_control(None)
                job.save_state(resume_pending=True)
            return
        job.set_control(None)
        job.save_state(status="queued", resume_pending=False)
        job.events.emit("status", "Resumed; queued for training.", status="queued")
        await self.relay(job)
        self.queue.put_nowait(job.job_id)

    # --- running ---------------------------------------------------------------------------

    async def _work(self) -> None:
        while True:
            job_id = await self.queue.get()
            job = self.folder(job_id)
            if job.state()["status"] != "queued":
                continue  # cancelled or paused while it waited
            self.current = job_id
            try:
                await self._run(job)
            except Exception:
                log.exception("training job %s: the trainer could not run it", job_id)
                await self._crashed(job, "the trainer could not start the training process")
            finally:
                self.current = None

    async def _run(self, job: JobFolder) -> None:
        job.save_state(status="running")
        out = await asyncio.to_thread(open, job.path / "train.log", "ab")
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "services.trainer.run",
                str(job.path),
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                env=self._env(),
                start_new_session=True,
                # Spawned from the event loop's thread, which lives as long as the service: the
                # kernel kills the run when the service dies, however it ends.
                preexec_fn=die_with_parent,  # noqa: PLW1509 (it only calls prctl)
            )
        finally:
            out.close()
        self.children[job.job_id] = process
        log.info("training job %s running in process %d", job.job_id, process.pid)
        try:
            while True:
                try:
                    await asyncio.wait_for(process.wait(), RELAY_INTERVAL)
                    break
                except TimeoutError:
                    await self._relay_quietly(job)
        finally:
            self.children.pop(job.job_id, None)
        await self._relay_quietly(job, patience=60.0)
        status = job.last_status()
        if process.returncode != 0 or status not in (*TERMINAL, "paused"):
            await self._crashed(job, f"the training process exited with code {process.returncode}")
            return
        control = job.control()
        await self._settle(job, status)
        if status != "paused":
            return
        if control == "cancel":  # asked while the run was already pausing
            await self._cancel(job, status)
        elif job.state().get("resume_pending"):  # asked while the run was already pausing
            await self._resume(job, status)

    async def _settle(self, job: JobFolder, status: str) -> None:
        """Record the outcome a run reported; a finished run's local checkpoints go (the adapter is
        in the blob store), a failed one's stay for inspection."""
        job.set_control(None)
        job.save_state(status=status)
        if status in ("succeeded", "cancelled"):
            await asyncio.to_thread(job.drop_checkpoints)

    async def _crashed(self, job: JobFolder, why: str) -> None:
        """A run ended without reporting an outcome: resume it from its checkpoint, or fail clearly."""
        attempts = job.state().get("attempts", 0) + 1
        if job.control() == "cancel":
            job.save_state(status="cancelled", attempts=attempts)
            job.events.emit("status", "Training cancelled.", status="cancelled")
        elif attempts < self.max_attempts:
            job.save_state(status="queued", attempts=attempts)
            job.events.emit(
                "message",
                f"Training stopped unexpectedly ({why}); resuming from the last checkpoint.",
                level="warn",
            )
            self.queue.put_nowait(job.job_id)
        else:
            job.save_state(status="failed", attempts=attempts)
            job.events.emit(
                "status",
                f"Training failed: {why}, and the run had already stopped unexpectedly "
                f"{attempts - 1} time(s). Its checkpoints are kept; start a new job to retry.",
                status="failed",
                level="error",
                error_code="trainer_crashed",
            )
        await self.relay(job)

    def _env(self) -> dict[str, str]:
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "DISTILLERY_BLOB_URL": self.settings.resolved_blob_url(),
            "DISTILLERY_MODEL_STORE_DIR": str(self.settings.resolved_model_store_dir()),
            "DISTILLERY_TRAINER_MAX_STEPS": str(self.settings.trainer_max_steps),
            "DISTILLERY_PARENT_PID": str(os.getpid()),
        }
        return {**env, **self.child_env}

    # --- events ----------------------------------------------------------------------------

    async def _relay_quietly(self, job: JobFolder, patience: float = 0.0) -> None:
        """Relay, retrying for ``patience`` seconds; what is left goes out with the job's next relay
        (the lines stay in the file, and every start relays every job's backlog)."""
        deadline = asyncio.get_running_loop().time() + patience
        delay = 0.5
        while True:
            try:
                await self.relay(job)
                return
            except Exception as exc:
                if asyncio.get_running_loop().time() >= deadline:
                    log.warning("relaying events of job %s failed: %s; will retry", job.job_id, exc)
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def relay(self, job: JobFolder) -> None:
        """Publish the job's event lines not yet published, in order, remembering how far it got."""
        async with self._relay_lock:
            state = job.state()
            start = int(state.get("relayed", 0))
            lines = read_events(job.path / EVENTS_FILE, start)
            if not lines:
                return
            request = json.loads((job.path / REQUEST_FILE).read_bytes())
            for offset, line in enumerate(lines):
                await self.publish(training_event(request, start + offset, line))
                job.save_state(relayed=start + offset + 1)


def kill_child(process: asyncio.subprocess.Process) -> None:
    """Kill a run's whole process group (tests simulate a crash with it)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
