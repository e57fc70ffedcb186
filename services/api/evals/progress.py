"""Following an eval from the CLI: a progress bar over ``GET /evals/{id}``, then the results table."""

from __future__ import annotations

import time
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

FINISHED = ("succeeded", "failed", "cancelled")


def _get(http: httpx.Client, path: str) -> dict[str, Any]:
    response = http.get(path)
    if response.status_code != 200:
        raise RuntimeError(f"GET {path}: {response.status_code} {response.text[:300]}")
    return response.json()


def watch_eval(http: httpx.Client, eval_id: str, *, console: Console, poll: float = 0.5) -> dict[str, Any]:
    state = _get(http, f"/evals/{eval_id}")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(f"{state['name']} ({state['status']})", total=state["progress"]["total"] or None)
        while True:
            bar.update(
                task,
                completed=state["progress"]["done"],
                description=f"{state['name']} ({state['status']})",
            )
            if state["status"] in FINISHED:
                return state
            time.sleep(poll)
            state = _get(http, f"/evals/{eval_id}")


def results_table(http: httpx.Client, eval_id: str) -> Table:
    rows = _get(http, f"/evals/{eval_id}/results")["data"]
    table = Table("evaluator", "model", "score", "pass rate", "win rate", "rows", "errors", "latency ms")

    def number(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    for row in rows:
        table.add_row(
            row["evaluator"],
            row["model"],
            number(row["score"]),
            number(row["passRate"]),
            number(row["winRate"]),
            str(row["rows"]),
            str(row["errors"]),
            "-" if row["latencyMs"] is None else str(row["latencyMs"]),
        )
    return table
