"""Client side of training, for the CLI and the demo: start a run over HTTP and watch it with a
rich progress bar (step / total, loss, tokens/s, ETA) until it finishes."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

TERMINAL = ("succeeded", "failed", "cancelled")


def model_request(
    *,
    dataset_id: str,
    base_model: str,
    slug: str,
    epochs: int | None = None,
    dpo: bool = False,
    pruning_rule_ids: list[str] | None = None,
) -> dict[str, Any]:
    """The ``POST /models`` body for a plain SFT (optionally + DPO) run."""
    sft: dict[str, Any] = {"batch_size": "auto"}
    if epochs is not None:
        sft["num_epochs"] = epochs
    config = {
        "provider": "openpipe",
        "baseModel": base_model,
        "enable_sft": True,
        "enable_preference_tuning": dpo,
        "sft_hyperparameters": sft,
    }
    body = {"datasetId": dataset_id, "slug": slug, "trainingConfig": config}
    if pruning_rule_ids:
        body["pruningRuleIds"] = pruning_rule_ids
    return body


def create_model(http: httpx.Client, **request: Any) -> dict[str, Any]:
    """``POST /models`` (see ``model_request``); RuntimeError with the api's message on a 4xx/5xx."""
    return _job(http.post("/models", json=model_request(**request)))


def _message(response: httpx.Response) -> str:
    try:
        return str(response.json().get("message") or response.text)
    except ValueError:
        return f"HTTP {response.status_code}: {response.text[:200]}"


def _fields(job: dict[str, Any]) -> dict[str, Any]:
    progress = job.get("progress") or {}
    loss = progress.get("train_loss")
    rate = progress.get("tokens_per_second")
    return {
        "status": job["status"],
        "loss": f"{loss:.4f}" if isinstance(loss, int | float) else "-",
        "rate": f"{rate:,.0f}" if isinstance(rate, int | float) else "-",
    }


class JobBar:
    """A rich progress bar for one fine-tuning job: status, step/total, loss, tokens/s, elapsed, ETA."""

    def __init__(self, console: Console, label: str) -> None:
        columns = (
            TextColumn("[bold]{task.fields[status]:<16}"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[rate]} tok/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
        )
        self.progress = Progress(*columns, console=console, transient=False)
        self.task = self.progress.add_task(label, total=None, status="…", loss="-", rate="-")

    def __enter__(self) -> JobBar:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)  # type: ignore[arg-type]

    def show(self, job: dict[str, Any]) -> bool:
        """Draw ``job`` (a ``GET /fine_tuning/jobs/{id}`` body); True once it is finished."""
        progress = job.get("progress") or {}
        total, step = progress.get("total_steps"), progress.get("step")
        update: dict[str, Any] = _fields(job)
        if isinstance(total, int) and total > 0:
            update["total"] = total
            update["completed"] = total if job["status"] == "succeeded" else min(step or 0, total)
        self.progress.update(self.task, **update)
        return job["status"] in TERMINAL


def _job(response: httpx.Response) -> dict[str, Any]:
    if response.status_code >= 400:
        raise RuntimeError(_message(response))
    return response.json()


def watch_job(
    http: httpx.Client,
    job_id: str,
    *,
    console: Console | None = None,
    poll_seconds: float = 1.0,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Poll ``GET /fine_tuning/jobs/{id}`` and draw its progress until it is finished; returns the job."""
    deadline = None if timeout is None else time.monotonic() + timeout
    with JobBar(console or Console(), job_id) as bar:
        while True:
            job = _job(http.get(f"/fine_tuning/jobs/{job_id}"))
            if bar.show(job):
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is still {job['status']} after {timeout:.0f}s")
            time.sleep(poll_seconds)


async def watch_job_async(
    http: httpx.AsyncClient, job_id: str, *, console: Console, poll_seconds: float = 1.0, timeout: float
) -> dict[str, Any]:
    """``watch_job`` for async callers (the demo runs the platform in the same event loop)."""
    deadline = time.monotonic() + timeout
    with JobBar(console, job_id) as bar:
        while True:
            job = _job(await http.get(f"/fine_tuning/jobs/{job_id}"))
            if bar.show(job):
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is still {job['status']} after {timeout:.0f}s")
            await asyncio.sleep(poll_seconds)


def summary(job: dict[str, Any]) -> str:
    """One line for the end of a run."""
    if job["status"] == "succeeded":
        cost = job.get("cost_usd")
        priced = f", ${cost:.4f}" if isinstance(cost, int | float) else ""
        curve = f"; loss curve: {job['loss_curve']}" if job.get("loss_curve") else ""
        return (
            f"[green]succeeded[/]: model [bold]{job['fine_tuned_model']}[/] "
            f"({job.get('trained_tokens') or 0:,} training tokens{priced}){curve}"
        )
    error = (job.get("error") or {}).get("message") or ""
    return f"[red]{job['status']}[/]{': ' + error if error else ''}"
