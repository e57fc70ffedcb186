"""``distillery demo``: the main job on embedded defaults, end to end, in one command.

Starts the platform (Tansu, chDB, SQLite, local blobs), sends realistic sample traffic
through the public API, waits until every call is queryable and shows what was captured.
Each later capability extends this until it runs the whole loop.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import defaultdict
from pathlib import Path

import httpx
import orjson
import uvicorn
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from services.common.kafka import TansuBroker, free_port
from services.common.settings import Settings
from services.platform import Platform
from services.sample_traffic import sample_reports

CONCURRENCY = 32


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description:<28}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )


async def _send_traffic(client: httpx.AsyncClient, n_logs: int, progress: Progress) -> int:
    reports = sample_reports(n_logs, seed=int(time.time()), anthropic_share=0.1)
    task = progress.add_task("sending calls to /report", total=len(reports))
    queue: asyncio.Queue = asyncio.Queue()
    for item in reports:
        queue.put_nowait(item)
    failures = 0

    async def worker() -> None:
        nonlocal failures
        while not queue.empty():
            route, body = queue.get_nowait()
            response = await client.post(route, json=body)
            failures += response.status_code != 200
            progress.advance(task)

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return failures


async def _wait_captured(client: httpx.AsyncClient, expected: int, progress: Progress) -> None:
    task = progress.add_task("captured in ClickHouse", total=expected)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        count = (await client.get("/logs/count")).json()["count"]
        progress.update(task, completed=count)
        if count >= expected:
            return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"only {count} of {expected} logs were captured within 120s")


def _summary(lines: list[dict]) -> Table:
    stats: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for line in lines:
        output = line["output"] or {}
        model = (line["input"] or {}).get("model", "?")
        row = stats[model]
        row["calls"] += 1
        row["errors"] += "error" in output
        usage = output.get("usage") or {}
        row["tokens"] += usage.get("total_tokens", 0)
    table = Table(title="Captured request logs (from GET /logs/export)")
    for column in ("model", "calls", "errors", "tokens"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for model, row in sorted(stats.items(), key=lambda kv: -kv[1]["calls"]):
        table.add_row(model, f"{row['calls']:.0f}", f"{row['errors']:.0f}", f"{row['tokens']:,.0f}")
    return table


async def _show_capabilities(client: httpx.AsyncClient, console: Console) -> None:
    lines = [orjson.loads(x) for x in (await client.get("/logs/export")).text.splitlines()]
    console.print(_summary(lines))
    newest = (await client.get("/logs", params={"limit": 1})).json()["data"][0]
    console.print(
        f"newest log [bold]{newest['id']}[/]: {newest['model']} · {newest['latencyMs']} ms · "
        f"{newest['usage']['total_tokens']} tokens · cost ${newest['cost'] or 0:.6f} · "
        f"metadata {newest['metadata']}"
    )
    errors = (await client.get("/logs/count", params={"status": "error"})).json()["count"]
    sql = (await client.get("/logs/count", params={"metadata.prompt_id": "text-to-sql-v2"})).json()["count"]
    console.print(f"search: {errors} failed calls · {sql} calls with metadata.prompt_id=text-to-sql-v2")
    tagged = await client.post(
        "/logs/update-metadata",
        json={
            "filters": [{"field": "metadata.customer_tier", "equals": "enterprise"}],
            "metadata": {"relabel": "true"},
        },
    )
    console.print(f"update-metadata: tagged {tagged.json()['matchedLogs']} enterprise calls relabel=true")


async def _wait_job(
    client: httpx.AsyncClient, dataset_id: str, job: dict, progress: Progress, label: str
) -> dict:
    task = progress.add_task(label, total=job["progress"]["total"] or 1)
    while job["status"] not in ("succeeded", "partial", "failed"):
        await asyncio.sleep(0.2)
        job = (await client.get(f"/datasets/{dataset_id}/jobs/{job['id']}")).json()
        progress.update(task, completed=job["progress"]["done"], total=job["progress"]["total"] or 1)
    return job


async def _build_dataset(client: httpx.AsyncClient, console: Console) -> tuple[str, str] | None:
    """Curate the captured traffic: import one prompt's logs, prune its static prompt, freeze it."""
    prompt_id = "support-triage-v3"
    dataset = (await client.post("/datasets", json={"name": f"{prompt_id} (demo)"})).json()
    started = (
        await client.post(
            f"/datasets/{dataset['id']}/import-logs",
            json={"filters": {"metadata": {"prompt_id": prompt_id}, "status": "success"}},
        )
    ).json()
    with _progress(console) as progress:
        job = await _wait_job(client, dataset["id"], started, progress, "importing logs as entries")
    entries = (await client.get(f"/datasets/{dataset['id']}/entries", params={"limit": 1})).json()["data"]
    if not entries:
        console.print("no logs matched the demo prompt; skipping the dataset step")
        return None
    system_prompt = entries[0]["messages"][0]["content"]
    rule = (
        await client.post(f"/datasets/{dataset['id']}/pruning-rules", json={"text": system_prompt})
    ).json()
    preview = (
        await client.post(f"/datasets/{dataset['id']}/pruning-rules/preview", json={"limit": 1})
    ).json()
    exporting = (await client.post(f"/datasets/{dataset['id']}/export")).json()  # a job since 170d03f
    with _progress(console) as progress:
        export = (await _wait_job(client, dataset["id"], exporting, progress, "exporting JSONL"))["result"]
    snapshot = (await client.post(f"/datasets/{dataset['id']}/snapshots")).json()
    stats = (await client.get(f"/datasets/{dataset['id']}")).json()
    table = Table(title=f"Dataset {dataset['id']} from the {prompt_id!r} logs")
    table.add_column("step")
    table.add_column("result")
    table.add_row(
        "import from logs",
        f"{job['result'].get('entries_created', stats['dataset_entry_count'])} entries "
        f"({stats['train_entry_count']} TRAIN / {stats['test_entry_count']} TEST)",
    )
    totals = preview["totals"]
    table.add_row(
        "pruning rule (the system prompt)",
        f"saves {totals['tokens_saved']:,} of {totals['tokens_before']:,} prompt tokens "
        f"in {totals['entries_affected']} entries",
    )
    table.add_row(
        "export (JSONL)", f"{export['entry_count']} lines, {export['bytes']:,} bytes at {export['uri']}"
    )
    table.add_row(
        "snapshot for training", f"{snapshot['content_hash'][:16]}… ({snapshot['entry_count']} rows)"
    )
    console.print(table)
    return dataset["id"], rule["id"]


async def _train(client: httpx.AsyncClient, console: Console, dataset_id: str, rule_id: str) -> None:
    """Fine-tune the tiny base on the dataset (its pruning rule copied onto the model) and follow the job."""
    from services.api.fine_tuning import progress

    body = progress.model_request(
        dataset_id=dataset_id,
        base_model="distillery/tiny-chat",
        slug="support-triage-tiny",
        epochs=1,
        pruning_rule_ids=[rule_id],
    )
    created = await client.post("/models", json=body)
    if created.status_code >= 400:
        console.print(f"[red]training was refused: {created.json().get('message')}[/]")
        return
    model = created.json()
    console.print(
        f"training model [bold]{model['id']}[/] on distillery/tiny-chat (job {model['openpipe']['jobId']})"
    )
    job = await progress.watch_job_async(
        client, model["openpipe"]["jobId"], console=console, poll_seconds=0.5, timeout=600
    )
    console.print(progress.summary(job))
    status = (await client.get(f"/models/{model['id']}")).json()["openpipe"]["status"]
    console.print(f"model {model['id']}: {status}")
    await _ask_trained_model(client, console, dataset_id, model["id"])


async def _ask_trained_model(client: httpx.AsyncClient, console: Console, dataset_id: str, slug: str) -> None:
    """Once serving has it (DEPLOYED), ask the fine-tuned model and its base one question each
    through the official openai SDK, and show the answers side by side."""
    import openai
    from rich.markup import escape

    deadline = time.monotonic() + 300
    with console.status(f"deploying {slug} on the model server (loaded, then probed)..."):
        while (status := (await client.get(f"/models/{slug}")).json()["openpipe"]["status"]) != "DEPLOYED":
            if status == "ERROR" or time.monotonic() > deadline:
                console.print(f"[red]model {slug} was not deployed ({status})[/]")
                return
            await asyncio.sleep(1)
    console.print(f"model {slug}: DEPLOYED")
    entry = (await client.get(f"/datasets/{dataset_id}/entries", params={"limit": 1})).json()["data"][0]
    question = entry["messages"][:-1]
    sdk = openai.AsyncOpenAI(
        base_url=str(client.base_url), api_key=client.headers["authorization"].removeprefix("Bearer ")
    )
    table = Table(title="one question, two models (openai SDK, through the router)")
    table.add_column("model")
    table.add_column("answer", overflow="fold")
    for model in (f"openpipe:{slug}", "openpipe:base/distillery/tiny-chat"):
        try:
            answer = await sdk.chat.completions.create(
                model=model, messages=question, max_tokens=48, temperature=0
            )
            text = escape(answer.choices[0].message.content or str(answer.choices[0].message.tool_calls))
        except openai.APIError as exc:
            text = f"[red]{escape(str(exc))}[/]"
        table.add_row(model, text)
    console.print(f"question: {escape(repr(question[-1].get('content')))}")
    console.print(table)


async def run_demo(*, data_dir: Path, n_logs: int, console: Console) -> None:
    """Run the demo in ``data_dir``, which must be empty (the demo starts from nothing)."""
    tansu = TansuBroker(free_port(), log_path=data_dir / "tansu.log")
    tansu.start()
    key = f"opk_demo_{secrets.token_hex(8)}"
    settings = Settings(
        data_dir=data_dir,
        kafka_url=tansu.url,
        bootstrap_api_key=key,
        http_port=free_port(),
        grpc_port=free_port(),
        log_batch_max_ms=200,
    )
    server = uvicorn.Server(
        uvicorn.Config(
            Platform(settings).asgi,
            host="127.0.0.1",
            port=settings.http_port,
            log_level="warning",
            lifespan="on",
        )
    )
    serving = asyncio.create_task(server.serve())
    try:
        with console.status("starting Distillery (Tansu, chDB, SQLite, local blobs)..."):
            while not server.started:
                if serving.done():
                    serving.result()
                await asyncio.sleep(0.05)
        base_url = f"http://127.0.0.1:{settings.http_port}/api/v1"
        console.print(f"[bold green]Distillery is up[/] at {base_url} (Kafka {tansu.url})")
        async with httpx.AsyncClient(
            base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30
        ) as client:
            started = time.monotonic()
            with _progress(console) as progress:
                failures = await _send_traffic(client, n_logs, progress)
                await _wait_captured(client, n_logs - failures, progress)
            elapsed = time.monotonic() - started
            console.print(
                f"{n_logs - failures} calls captured in {elapsed:.1f}s "
                f"({(n_logs - failures) / elapsed:,.0f} logs/s), {failures} refused"
            )
            await _show_capabilities(client, console)
            built = await _build_dataset(client, console)
            if built is not None:
                await _train(client, console, *built)
    finally:
        server.should_exit = True
        await serving
        tansu.stop()
        console.print("Distillery stopped.")
