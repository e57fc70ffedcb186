"""Criteria wiring for the api: routes, the judgements consumer, the gRPC clients its jobs use
(the judge's ``Judge`` and the router's ``Inference``) and republication of every criterion."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from services.api.criteria import service
from services.api.criteria.consumers import register_judgements_consumer
from services.api.criteria.jobs import Workers
from services.api.criteria.views import UPLOAD_PATH, router
from services.api.providers.service import publish
from services.common.http import API_PREFIX, exempt_from_body_limit
from services.common.inference_client import InferenceClient
from services.common.secrets import internal_token
from services.judge.client import JudgeClient
from services.judge.criteria import catalog_sync

if TYPE_CHECKING:
    from services.platform import Platform

log = logging.getLogger(__name__)


def setup_criteria(platform: Platform) -> None:
    settings = platform.settings
    sessions = platform.state["sessions"]
    token = internal_token(settings)
    workers = Workers(
        sessions=sessions,
        judge=JudgeClient(settings.resolved_judge_grpc_url(), token),
        inference=InferenceClient(settings.resolved_router_grpc_url(), token),
    )
    platform.state["criteria_workers"] = workers
    # After a criterion write: wait until this process's catalog.v1 readers (the judge's and the
    # router's projections when they share the process) have applied it: read your writes.
    platform.state["criteria_catalog_sync"] = catalog_sync(platform.catalog)
    platform.routers.append(router)
    exempt_from_body_limit(platform.app, "POST", API_PREFIX + UPLOAD_PATH)  # JSONL, not JSON; 10 MB cap
    register_judgements_consumer(platform.broker, sessions, settings)

    async def publish_criteria() -> None:
        async with sessions.begin() as session:
            if failed := await service.fail_interrupted_jobs(session=session):
                log.warning("marked %d interrupted criteria job(s) failed", failed)
        # Tansu keeps nothing across restarts and a new judge needs every criterion: republish.
        async with sessions() as session:
            records = await service.catalog_records(session=session)
        await publish(broker=platform.broker, records=records, timeout=settings.publish_timeout_seconds)
        log.info("republished %d criteria on catalog.v1", len(records))

    platform.on_started.append(publish_criteria)
    platform.on_stop.append(workers.close)
