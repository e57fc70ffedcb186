"""The ``distillery`` command: run the platform, mint keys, run the demo."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import time
from pathlib import Path

import typer
from rich.console import Console

from services.common.settings import Settings

app = typer.Typer(
    help="Distillery: turn production LLM traffic into smaller fine-tuned models.", no_args_is_help=True
)
keys_app = typer.Typer(help="Manage API keys.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
console = Console()

RUN_FILE = "run.json"


def _settings(data_dir: Path, **overrides: object) -> Settings:
    return Settings(data_dir=data_dir, **{k: v for k, v in overrides.items() if v is not None})


@app.command()
def up(
    port: int = typer.Option(8080, help="HTTP port for every /api/v1 route."),
    grpc_port: int = typer.Option(50051, help="gRPC port."),
    data_dir: Path = typer.Option(Path(".distillery"), help="Where chDB, SQLite, blobs and the broker live."),
    host: str = typer.Option("127.0.0.1", help="Interface to bind."),
) -> None:
    """Run every service in one process on embedded defaults (durable Tansu on an embedded S3,
    chDB, SQLite, local blobs). Ctrl-C (or SIGTERM) refuses new requests, drains, then stops."""
    launched = time.monotonic()
    from services.common.embedded import Embedded

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = _settings(data_dir, http_port=port, grpc_port=grpc_port, http_host=host)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    embedded = Embedded(settings)
    embedded.begin()  # S3 and the broker start while the services are imported
    run_file = settings.data_dir / RUN_FILE
    try:
        from services.platform import Platform, import_services, run

        import_services()
        embedded.wait()
        embedded.write_run_file(port, grpc_port)
        console.print(
            f"[bold green]Distillery[/] on http://{host}:{port}/api/v1 · gRPC {host}:{grpc_port} · "
            f"{embedded.describe()} · data in {settings.data_dir}"
        )
        platform = Platform(settings)
        platform.launched_at = launched
        # uvicorn re-raises the signal it stopped on once drained: SIGTERM then ends like Ctrl-C,
        # through the clean-up below, instead of killing the process before the children stop.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        run(platform)
    except KeyboardInterrupt:
        pass
    finally:
        run_file.unlink(missing_ok=True)
        embedded.stop()
        console.print("Distillery stopped.")


@keys_app.command("create")
def keys_create(
    project: str = typer.Option("default", help="Project name; created if it does not exist."),
    data_dir: Path = typer.Option(Path(".distillery")),
) -> None:
    """Mint an API key for a project. The key is shown once; only its hash is stored."""
    from services.api.projects import service as projects
    from services.common.db import make_engine, make_sessionmaker, migrate

    settings = _settings(data_dir)

    async def create() -> tuple[str, str]:
        url = settings.resolved_database_url()
        await migrate(url)
        engine = make_engine(url)
        try:
            async with make_sessionmaker(engine).begin() as session:
                found = await projects.get_project_by_name(session=session, name=project)
                found = found or await projects.create_project(session=session, name=project)
                row, plain = await projects.add_api_key(session=session, project_id=found.id)
            await _announce(settings, row)
            return found.id, plain
        finally:
            await engine.dispose()

    project_id, key = asyncio.run(create())
    console.print(f"project [bold]{project}[/] ({project_id})")
    console.print(f"API key: [bold]{key}[/]  (shown once)")


async def _announce(settings: Settings, row: object) -> None:
    """Tell a running platform about the new key; otherwise it is published on its next start."""
    from services.api.projects import service as projects
    from services.common.kafka import make_broker

    run_file = settings.data_dir / RUN_FILE
    kafka_url = os.environ.get("DISTILLERY_KAFKA_URL")
    if not kafka_url and run_file.exists():
        kafka_url = json.loads(run_file.read_text())["kafka_url"]
    if not kafka_url:
        return
    broker = make_broker(kafka_url)
    try:
        await asyncio.wait_for(broker.start(), 10)
        await projects.publish_keys(broker=broker, keys=[row])  # type: ignore[list-item]
    except Exception:
        console.print("[yellow]platform not reachable: the key becomes active at its next start[/]")
    finally:
        await broker.stop()


@app.command()
def info(
    data_dir: Path = typer.Option(Path(".distillery"), help="The data dir `distillery up` uses."),
) -> None:
    """Where the running platform listens (HTTP, gRPC, Kafka) and the ids of its projects."""
    from services.api.projects import service as projects
    from services.common.db import make_engine, make_sessionmaker, migrate

    settings = _settings(data_dir)
    run_file = settings.data_dir / RUN_FILE
    if run_file.exists():
        running = json.loads(run_file.read_text())
        console.print(f"HTTP   http://{settings.http_host}:{running['http_port']}/api/v1")
        if running.get("grpc_port"):
            console.print(f"gRPC   {settings.http_host}:{running['grpc_port']} (plaintext)")
        console.print(f"Kafka  {running['kafka_url']}  (topic logs.v1, key = project id)")
        if running.get("kafka_storage"):
            durable = "durable, in the embedded S3" if running["kafka_storage"] == "s3" else "in memory"
            console.print(f"       broker storage: {durable}")
        if running.get("s3_endpoint"):
            console.print(f"S3     {running['s3_endpoint']}  (embedded SeaweedFS; credentials in s3/s3.json)")
    else:
        console.print(f"[yellow]no platform is running on {settings.data_dir}[/]")

    async def listed() -> list[tuple[str, str]]:
        url = settings.resolved_database_url()
        await migrate(url)
        engine = make_engine(url)
        try:
            async with make_sessionmaker(engine)() as session:
                return [(p.id, p.name) for p in await projects.list_projects(session=session)]
        finally:
            await engine.dispose()

    for project_id, name in asyncio.run(listed()):
        console.print(f"project {name}: {project_id}")


@app.command()
def demo(
    logs: int = typer.Option(2000, help="How many sample calls to send."),
    data_dir: Path = typer.Option(Path(".distillery/demo"), help="Data dir for the demo platform."),
) -> None:
    """Start the platform, send realistic sample traffic through the API and show what was captured."""
    from services.demo import run_demo

    shutil.rmtree(data_dir, ignore_errors=True)  # the demo always starts from nothing
    data_dir.mkdir(parents=True)
    asyncio.run(run_demo(data_dir=data_dir, n_logs=logs, console=console))


# --- training (over HTTP, against a running platform) ----------------------------------------

jobs_app = typer.Typer(help="Follow fine-tuning jobs.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")
BASE_URL = typer.Option(
    "http://127.0.0.1:8080/api/v1", envvar="DISTILLERY_BASE_URL", help="The platform's API."
)
API_KEY = typer.Option(
    ..., envvar=["DISTILLERY_API_KEY", "OPENPIPE_API_KEY"], help="A project key (opk_...)."
)


def _api(base_url: str, api_key: str):  # type: ignore[no-untyped-def]
    import httpx

    return httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=60)


@app.command()
def train(
    dataset: str = typer.Option(..., "--dataset", help="The dataset id to train on."),
    base: str = typer.Option(
        "distillery/tiny-chat", "--base", help="Base model (or an earlier model's slug)."
    ),
    slug: str | None = typer.Option(None, help="The new model's slug (default: <dataset>-<time>)."),
    epochs: int | None = typer.Option(None, help="SFT epochs (default: chosen from the row count)."),
    dpo: bool = typer.Option(False, help="Also run DPO on rows with a rejected_message."),
    watch: bool = typer.Option(True, help="Follow the job until it finishes."),
    base_url: str = BASE_URL,
    api_key: str = API_KEY,
) -> None:
    """Fine-tune a model on a dataset (POST /models) and follow its job."""
    from services.api.fine_tuning import progress

    slug = slug or f"{dataset.replace('_', '-')}-{time.strftime('%Y%m%d-%H%M%S')}"
    with _api(base_url, api_key) as http:
        try:
            model = progress.create_model(
                http, dataset_id=dataset, base_model=base, slug=slug, epochs=epochs, dpo=dpo
            )
        except RuntimeError as exc:
            console.print(f"[red]{exc}[/]")
            raise typer.Exit(1) from None
        job_id = model["openpipe"]["jobId"]
        console.print(f"model [bold]{model['id']}[/] ({model['openpipe']['status']}), job {job_id}")
        if watch:
            job = progress.watch_job(http, job_id, console=console)
            console.print(progress.summary(job))
            raise typer.Exit(0 if job["status"] == "succeeded" else 1)


@jobs_app.command("watch")
def jobs_watch(
    job_id: str = typer.Argument(..., help="A fine-tuning job id (ftjob-...)."),
    base_url: str = BASE_URL,
    api_key: str = API_KEY,
) -> None:
    """Show a job's progress (step/total, loss, tokens/s, ETA) until it finishes."""
    from services.api.fine_tuning import progress

    with _api(base_url, api_key) as http:
        try:
            job = progress.watch_job(http, job_id, console=console)
        except RuntimeError as exc:
            console.print(f"[red]{exc}[/]")
            raise typer.Exit(1) from None
    console.print(progress.summary(job))
    raise typer.Exit(0 if job["status"] == "succeeded" else 1)


evals_app = typer.Typer(help="Follow evaluations.", no_args_is_help=True)
app.add_typer(evals_app, name="evals")


@evals_app.command("watch")
def evals_watch(
    eval_id: str = typer.Argument(..., help="An eval id (eval_...)."),
    base_url: str = BASE_URL,
    api_key: str = API_KEY,
) -> None:
    """Show an eval's progress (rows done/total) until it finishes, then its sorted results."""
    from services.api.evals import progress as eval_progress

    with _api(base_url, api_key) as http:
        try:
            state = eval_progress.watch_eval(http, eval_id, console=console)
            console.print(eval_progress.results_table(http, eval_id))
        except RuntimeError as exc:
            console.print(f"[red]{exc}[/]")
            raise typer.Exit(1) from None
    raise typer.Exit(0 if state["status"] == "succeeded" else 1)


if __name__ == "__main__":
    app()
