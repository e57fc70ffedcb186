"""Deployments wiring: the Deployer follows ``catalog.v1`` in the api process."""

from __future__ import annotations

from typing import TYPE_CHECKING

from services.api.deployments.service import Deployer

if TYPE_CHECKING:
    from services.platform import Platform


def setup_deployments(platform: Platform) -> None:
    deployer = Deployer(
        sessions=platform.state["sessions"],
        broker=platform.broker,
        blobs=platform.blobs,
        settings=platform.settings,
        catalog=platform.catalog,
    )
    platform.state["deployer"] = deployer
    platform.catalog.handlers.append(deployer.apply)

    async def start() -> None:
        deployer.start()

    platform.on_started.append(start)
    platform.on_stopping.append(deployer.stop)
