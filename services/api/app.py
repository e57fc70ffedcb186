"""API wiring: the catalog database, bootstrap project, key and provider-settings publication."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from services.api.criteria.wiring import setup_criteria
from services.api.dataset_files.views import UPLOAD_PATH
from services.api.dataset_files.views import router as dataset_files_router
from services.api.datasets import jobs as dataset_jobs
from services.api.datasets.views import router as datasets_router
from services.api.deployments.wiring import setup_deployments
from services.api.evals.wiring import setup_evals
from services.api.fine_tuning import openai_provider
from services.api.fine_tuning import service as fine_tuning
from services.api.fine_tuning.consumers import register_events_consumer
from services.api.fine_tuning.views import router as fine_tuning_router
from services.api.log_imports.client import LogImporter, default_workers
from services.api.log_imports.views import router as log_imports_router
from services.api.model_weights.views import router as model_weights_router
from services.api.projects import service as projects
from services.api.projects.views import router as projects_router
from services.api.providers import service as providers
from services.api.providers.views import router as providers_router
from services.api.pruning.views import router as pruning_router
from services.api.relabel.consumers import register_results_consumer
from services.api.relabel.views import router as relabel_router
from services.common.db import make_engine, make_sessionmaker, migrate
from services.common.http import API_PREFIX, exempt_from_body_limit
from services.common.secrets import internal_token

if TYPE_CHECKING:
    from services.platform import Platform

log = logging.getLogger(__name__)


async def setup(platform: Platform) -> None:
    settings = platform.settings
    url = settings.resolved_database_url()
    await migrate(url)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    platform.state["sessions"] = sessions
    # Seals provider secrets in the catalog and on catalog.v1; consumers load the same key.
    secret_key = platform.shared.secret_key
    if settings.secret_key is None and settings.database_url:
        log.warning(
            "DISTILLERY_SECRET_KEY is not set: provider secrets are sealed with %s; every api and "
            "router process needs that same key, so set DISTILLERY_SECRET_KEY in production",
            settings.data_dir / "secret.key",
        )
    platform.state["secret_key"] = secret_key
    platform.state["publish_timeout"] = settings.publish_timeout_seconds
    platform.state["catalog"] = platform.catalog  # writes apply here at once: read your writes
    platform.routers.append(projects_router)
    platform.routers.append(providers_router)
    platform.routers.append(datasets_router)
    # Log import reads ingest's gRPC LogQuery as an internal caller (only ingest touches ClickHouse).
    log_importer = LogImporter(
        settings.resolved_ingest_grpc_url(),
        internal_token(settings),
        workers=default_workers() if settings.log_import_workers is None else settings.log_import_workers,
    )
    platform.state["log_importer"] = log_importer
    platform.on_stop.append(log_importer.close)
    platform.routers.append(log_imports_router)
    platform.routers.append(pruning_router)
    platform.routers.append(relabel_router)
    register_results_consumer(platform.broker, sessions, settings)
    setup_criteria(platform)  # criteria, alignment sets, judgements.v1 consumer
    platform.routers.append(fine_tuning_router)
    register_events_consumer(platform.broker, sessions, settings, local=platform.catalog)
    setup_deployments(platform)  # trained models: DEPLOYED once their adapter answers a probe
    platform.routers.append(model_weights_router)  # GET /models/{slug}/weights
    setup_evals(platform, sessions)  # graders and evals routes, eval.events.v1 consumer
    # JSONL upload, export and snapshots go through the blob store (file:// or S3).
    platform.state["blobs"] = platform.blobs
    platform.state["settings"] = settings
    platform.routers.append(dataset_files_router)
    exempt_from_body_limit(platform.app, "POST", API_PREFIX + UPLOAD_PATH)  # enforces max_upload_bytes

    if settings.bootstrap_api_key is not None:
        async with sessions.begin() as session:
            if await projects.ensure_bootstrap_project(
                session=session, api_key=settings.bootstrap_api_key.get_secret_value()
            ):
                log.info("created the bootstrap project")
    async with sessions.begin() as session:  # before this process starts jobs of its own
        if failed := await dataset_jobs.fail_interrupted_jobs(session=session):
            log.warning("marked %d interrupted dataset job(s) failed", failed)

    async def publish_all_keys() -> None:
        # Tansu keeps nothing across restarts, and a new service needs every key: republish.
        async with sessions() as session:
            keys = await projects.active_keys(session=session)
        for key in keys:
            platform.keyring.add(key.key_hash, key.project_id)
        await projects.publish_keys(broker=platform.broker, keys=keys)

    async def publish_provider_settings() -> None:
        # Provider keys, external providers and deployments, for the router (same reason as above).
        async with sessions() as session:
            records = await providers.catalog_records(session=session)
        unreadable = providers.count_unreadable(records, secret_key)
        if unreadable:
            log.error(
                "%d stored provider secret(s) cannot be opened with the current secret key "
                "(DISTILLERY_SECRET_KEY or <data_dir>/secret.key was replaced?); set them again",
                unreadable,
            )
        await providers.publish(
            broker=platform.broker, records=records, timeout=settings.publish_timeout_seconds
        )
        log.info("republished %d provider-settings record(s) on catalog.v1", len(records))

    async def publish_models() -> None:
        # Fine-tuned models for the router and serving (same reason as above); resume OpenAI runs.
        async with sessions() as session:
            records = await fine_tuning.catalog_records(session=session)
        await fine_tuning.publish_records(
            broker=platform.broker, records=records, timeout=settings.publish_timeout_seconds
        )
        log.info("republished %d model record(s) on catalog.v1", len(records))
        await openai_provider.resume_all(platform.app.state)

    async def stop_openai_runs() -> None:
        await openai_provider.stop_all(platform.app.state)

    async def close() -> None:
        await engine.dispose()

    platform.on_started.append(publish_all_keys)
    platform.on_started.append(publish_provider_settings)
    platform.on_started.append(publish_models)
    platform.on_stopping.append(stop_openai_runs)
    platform.on_stop.append(close)
