"""OpenAI's files and fine-tuning jobs API, faked at the HTTP boundary (shapes from the OpenAI seed).

Each ``GET /v1/fine_tuning/jobs/{id}`` moves a job one step: ``validating_files`` → ``running``
(with a metrics event) → ``succeeded`` (``fine_tuned_model`` = ``ft:<base>:distillery:<suffix>:<id>``).
A training file containing ``[fail]`` makes the job fail instead, like OpenAI's own validation.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

OPENAI_KEY = "sk-test-openai-0123456789"


@dataclass
class FakeFineTuning:
    files: dict[str, bytes] = field(default_factory=dict)
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    events: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    polls: dict[str, int] = field(default_factory=dict)
    cancelled: list[str] = field(default_factory=list)


FAKE = FakeFineTuning()


def _unauthorized() -> JSONResponse:
    error = {"message": "Incorrect API key provided.", "type": "invalid_request_error", "param": None}
    return JSONResponse({"error": {**error, "code": "invalid_api_key"}}, status_code=401)


def _event(job_id: str, message: str, type: str = "message", data: dict | None = None) -> None:
    FAKE.events.setdefault(job_id, []).insert(
        0,
        {
            "id": f"ftevent-{secrets.token_hex(8)}",
            "object": "fine_tuning.job.event",
            "created_at": int(time.time()),
            "level": "info",
            "message": message,
            "type": type,
            "data": data or {},
        },
    )


def _advance(job: dict[str, Any]) -> None:
    polls = FAKE.polls[job["id"]] = FAKE.polls.get(job["id"], 0) + 1
    if job["status"] in ("succeeded", "failed", "cancelled"):
        return
    if b"[fail]" in FAKE.files.get(job["training_file"], b""):
        job.update(status="failed", finished_at=int(time.time()))
        job["error"] = {
            "code": "invalid_training_file",
            "message": "The job failed due to an invalid training file.",
            "param": "training_file",
        }
        return
    if polls == 1:
        job["status"] = "running"
        _event(
            job["id"],
            "Step 1/2: training loss=0.90",
            "metrics",
            {"step": 1, "total_steps": 2, "train_loss": 0.9},
        )
    elif polls >= 2:
        suffix = job.get("user_provided_suffix") or "model"
        job.update(
            status="succeeded",
            finished_at=int(time.time()),
            trained_tokens=1234,
            fine_tuned_model=f"ft:{job['model']}:distillery:{suffix}:{job['id'][-8:]}",
        )
        _event(job["id"], "The job has successfully completed")


def install(app: FastAPI) -> None:
    def authorized(request: Request) -> bool:
        return request.headers.get("authorization") == f"Bearer {OPENAI_KEY}"

    @app.post("/v1/files")
    async def create_file(request: Request) -> Any:
        if not authorized(request):
            return _unauthorized()
        form = await request.form()
        upload = form["file"]
        file_id = f"file-{secrets.token_hex(12)}"
        FAKE.files[file_id] = await upload.read()
        return {
            "id": file_id,
            "object": "file",
            "bytes": len(FAKE.files[file_id]),
            "created_at": int(time.time()),
            "filename": upload.filename,
            "purpose": form["purpose"],
            "status": "processed",
        }

    @app.post("/v1/fine_tuning/jobs")
    async def create_job(request: Request) -> Any:
        if not authorized(request):
            return _unauthorized()
        body = await request.json()
        if body["training_file"] not in FAKE.files:
            error = {
                "message": "invalid training_file",
                "type": "invalid_request_error",
                "param": "training_file",
            }
            return JSONResponse({"error": {**error, "code": None}}, status_code=400)
        job_id = f"ftjob-{secrets.token_hex(12)}"
        FAKE.jobs[job_id] = {
            "id": job_id,
            "object": "fine_tuning.job",
            "created_at": int(time.time()),
            "error": None,
            "fine_tuned_model": None,
            "finished_at": None,
            "hyperparameters": {"batch_size": "auto", "learning_rate_multiplier": "auto", "n_epochs": "auto"},
            "model": body["model"],
            "organization_id": "org-fake",
            "result_files": [],
            "seed": body.get("seed") or 42,
            "status": "validating_files",
            "trained_tokens": None,
            "training_file": body["training_file"],
            "validation_file": body.get("validation_file"),
            "method": body.get("method"),
            "metadata": body.get("metadata"),
            "user_provided_suffix": body.get("suffix"),
        }
        _event(job_id, f"Created fine-tuning job: {job_id}")
        return FAKE.jobs[job_id]

    @app.get("/v1/fine_tuning/jobs/{job_id}")
    async def get_job(job_id: str, request: Request) -> Any:
        if not authorized(request):
            return _unauthorized()
        job = FAKE.jobs[job_id]
        _advance(job)
        return job

    @app.get("/v1/fine_tuning/jobs/{job_id}/events")
    async def list_events(job_id: str, request: Request) -> Any:
        if not authorized(request):
            return _unauthorized()
        return {"object": "list", "data": FAKE.events.get(job_id, []), "has_more": False}

    @app.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    async def cancel(job_id: str, request: Request) -> Any:
        if not authorized(request):
            return _unauthorized()
        FAKE.cancelled.append(job_id)
        FAKE.jobs[job_id]["status"] = "cancelled"
        return FAKE.jobs[job_id]
