"""Relabel wiring: the worker consuming ``relabel.requests.v1`` and its gRPC client to the router."""

from __future__ import annotations

from typing import TYPE_CHECKING

from services.common.inference_client import InferenceClient
from services.common.secrets import internal_token
from services.relabel.consumers import register_relabel_worker

if TYPE_CHECKING:
    from services.platform import Platform


async def setup(platform: Platform) -> None:
    settings = platform.settings
    client = InferenceClient(settings.resolved_router_grpc_url(), internal_token(settings))
    register_relabel_worker(platform.broker, client, settings)
    platform.on_stop.append(client.close)
