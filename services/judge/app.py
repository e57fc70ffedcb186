"""Judge wiring: the criteria projection, the router client for judge models, gRPC ``Judge``,
``POST /criteria/judge`` and the verdict recorder (``judgements.v1``)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from services.common.http import API_PREFIX, BodySizeLimit
from services.common.inference_client import InferenceClient
from services.common.secrets import internal_token
from services.judge import judge_rpc
from services.judge.client import router_caller
from services.judge.criteria import CriteriaCatalog
from services.judge.fastpath import JudgeEndpoint
from services.judge.service import Judge
from services.judge.views import router
from services.judge.wiring import build_judge

if TYPE_CHECKING:
    from services.platform import Platform


@dataclass
class JudgeService:
    catalog: CriteriaCatalog
    judge: Judge


async def setup(platform: Platform) -> None:
    settings = platform.settings
    client = InferenceClient(settings.resolved_router_grpc_url(), internal_token(settings))
    # With the router in this process (distillery up) the judge is the router's best-of-N judge:
    # judge models are called on its ChatService directly (no gRPC round trip per verdict) and one
    # per-project cap covers every verdict. Alone, it reaches the router over gRPC Inference.
    chat = platform.state.get("chat")
    shared = getattr(chat, "best_of_n", None)
    if shared is not None:
        catalog, judge = shared.catalog, shared.judge
    else:
        catalog, judge = build_judge(platform, router_caller(client))
    platform.state["judge_service"] = JudgeService(catalog, judge)
    platform.routers.append(router)
    endpoint = JudgeEndpoint(keyring=platform.keyring, service=platform.state["judge_service"])
    platform.fast_routes[("POST", f"{API_PREFIX}/criteria/judge")] = BodySizeLimit(
        endpoint, settings.max_body_bytes
    )
    platform.grpc_servicers.append(
        partial(
            judge_rpc.add_to_server,
            catalog=catalog,
            judge=judge,
            keyring=platform.keyring,
            internal_token=internal_token(settings),
        )
    )
    platform.on_stop.append(client.close)
