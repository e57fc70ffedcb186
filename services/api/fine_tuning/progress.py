"""Client side of training, for the CLI and the demo: start a run over HTTP and watch it with a
rich progress bar (step / total, loss, tokens/s, ETA) until it finishes."""

from __future__ import annotations

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


def create_model(
    http: httpx.Client,
    *,
    dataset_id: str,
    base_model: str,
    slug: str,
    epochs: int | None = None,
    dpo: bool = False,
) -> dict[str, Any]:
    """``POST /models``; raises RuntimeError with the api's message on a 4xx/5xx."""
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
    response = http.post("/models", json={"datasetId": dataset_id, "slug": slug, "trainingConfig": config})
    if response.status_code >= 400:
        raise RuntimeError(_message(response))
    return response.json()


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


def watch_job(
    http: httpx.Client,
    job_id: str,
    *,
    console: Console | None = None,
    poll_seconds: float = 1.0,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Poll ``GET /fine_tuning/jobs/{id}`` and draw its progress until it is finished; returns the job."""
    console = console or Console()
    deadline = None if timeout is None else time.monotonic() + timeout
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
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(job_id, total=None, status="…", loss="-", rate="-")
        while True:
            response = http.get(f"/fine_tuning/jobs/{job_id}")
            if response.status_code >= 400:
                raise RuntimeError(_message(response))
            job = response.json()
            progress = job.get("progress") or {}
            total, step = progress.get("total_steps"), progress.get("step")
            update: dict[str, Any] = _fields(job)
            if isinstance(total, int) and total > 0:
                update["total"] = total
                update["completed"] = total if job["status"] == "succeeded" else min(step or 0, total)
            bar.update(task, **update)
            if job["status"] in TERMINAL:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is still {job['status']} after {timeout:.0f}s")
            time.sleep(poll_seconds)


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
