"""Eval wiring: the worker consuming ``eval.requests.v1``, its router and judge clients, and the
catalog.v1 projection that tells it which evals were cancelled or deleted."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from services.common.secrets import internal_token
from services.eval.clients import RouterClient
from services.eval.consumers import register_eval_worker
from services.eval.service import EvalWorker

if TYPE_CHECKING:
    from services.platform import Platform


def judge_client(platform: Platform) -> Any:
    """The judge's gRPC client when the judge package is installed (criterion evals need it)."""
    try:
        from services.judge.client import JudgeClient
    except ImportError:
        return None
    client = JudgeClient(platform.settings.resolved_judge_grpc_url(), internal_token(platform.settings))
    platform.on_stop.append(client.close)
    return client


async def setup(platform: Platform) -> None:
    settings = platform.settings
    models = RouterClient(settings.resolved_router_grpc_url(), internal_token(settings))
    worker = EvalWorker(models, settings, judge=judge_client(platform))
    platform.catalog.handlers.append(worker.apply_catalog)
    register_eval_worker(platform.broker, worker, settings)
    platform.on_stop.append(worker.close)
    platform.on_stop.append(models.close)
