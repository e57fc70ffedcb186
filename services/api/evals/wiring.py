"""Evals in the api: the graders routes, the evals routes and the ``eval.events.v1`` consumer."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.api.evals.consumers import register_events_consumer
from services.api.evals.graders_views import router as graders_router
from services.api.evals.views import router as evals_router
from services.common.secrets import internal_token
from services.eval.clients import RouterClient

if TYPE_CHECKING:
    from services.platform import Platform


def setup_evals(platform: Platform, sessions: async_sessionmaker[AsyncSession]) -> None:
    settings = platform.settings
    # The graders route asks models (score_model, label_model, cosine) through the router's gRPC.
    client = RouterClient(settings.resolved_router_grpc_url(), internal_token(settings))
    platform.state["grader_models"] = client
    platform.on_stop.append(client.close)
    platform.routers.append(graders_router)
    platform.routers.append(evals_router)
    register_events_consumer(platform.broker, sessions, settings)
