"""API wiring: the catalog database, bootstrap project, key publication."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from services.api.projects import service as projects
from services.api.projects.views import router as projects_router
from services.common.db import make_engine, make_sessionmaker, migrate

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
    platform.routers.append(projects_router)

    if settings.bootstrap_api_key is not None:
        async with sessions.begin() as session:
            if await projects.ensure_bootstrap_project(
                session=session, api_key=settings.bootstrap_api_key.get_secret_value()
            ):
                log.info("created the bootstrap project")

    async def publish_all_keys() -> None:
        # Tansu keeps nothing across restarts, and a new service needs every key: republish.
        async with sessions() as session:
            keys = await projects.active_keys(session=session)
        for key in keys:
            platform.keyring.add(key.key_hash, key.project_id)
        await projects.publish_keys(broker=platform.broker, keys=keys)

    async def close() -> None:
        await engine.dispose()

    platform.on_started.append(publish_all_keys)
    platform.on_stop.append(close)
