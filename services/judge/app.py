"""Judge wiring: the criteria projection, the router client for judge models, gRPC ``Judge``,
``POST /criteria/judge`` and the verdict recorder (``judgements.v1``)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from services.common.events import JUDGEMENTS_TOPIC, JudgementEvent
from services.common.http import API_PREFIX, BodySizeLimit
from services.common.secrets import internal_token
from services.judge import grpc as judge_grpc
from services.judge.client import router_caller
from services.judge.criteria import CriteriaCatalog, catalog_sync
from services.judge.service import Judge, JudgementRecorder
from services.judge.views import JudgeEndpoint, router
from services.relabel.service import InferenceClient
from services.router.criteria import chat_caller

if TYPE_CHECKING:
    from services.platform import Platform


@dataclass
class JudgeService:
    catalog: CriteriaCatalog
    judge: Judge


async def setup(platform: Platform) -> None:
    settings = platform.settings
    catalog = CriteriaCatalog(sync=catalog_sync(platform.catalog))
    platform.catalog.handlers.append(catalog.apply)
    client = InferenceClient(settings.resolved_router_grpc_url(), internal_token(settings))

    async def publish(event: JudgementEvent) -> None:
        await platform.broker.publish(
            event.model_dump(mode="json"), JUDGEMENTS_TOPIC, key=event.project_id.encode()
        )

    recorder = JudgementRecorder(publish)
    # With the router in this process (distillery up), judge models are called on its ChatService
    # directly: the same routing, retries and limits, without a gRPC round trip per verdict.
    chat = platform.state.get("chat")
    judge = Judge(
        chat_caller(chat) if chat is not None else router_caller(client),
        max_concurrency=settings.judge_project_max_concurrency,
        max_attempts=settings.judge_max_attempts,
        recorder=recorder.record,
    )
    platform.state["judge_service"] = JudgeService(catalog, judge)
    platform.routers.append(router)
    endpoint = JudgeEndpoint(keyring=platform.keyring, service=platform.state["judge_service"])
    platform.fast_routes[("POST", f"{API_PREFIX}/criteria/judge")] = BodySizeLimit(
        endpoint, settings.max_body_bytes
    )
    platform.grpc_servicers.append(
        partial(
            judge_grpc.add_to_server,
            catalog=catalog,
            judge=judge,
            keyring=platform.keyring,
            internal_token=internal_token(settings),
        )
    )
    platform.on_stopping.append(recorder.stop)
    platform.on_stop.append(client.close)
