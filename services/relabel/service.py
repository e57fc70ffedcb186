"""Relabeling one entry: ask the router (gRPC ``Inference``) for a new output, retrying what is transient."""

from __future__ import annotations

import asyncio
import logging
import random

import grpc

from services.common.events import RelabelItem, RelabelRequest, RelabelResult
from services.common.inference_client import InferenceClient, completion_output

log = logging.getLogger(__name__)

RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
    }
)
# What the model is asked to produce is the output alone: these request fields stay.
REQUEST_FIELDS = ("messages", "tools", "tool_choice", "response_format")


def _request_for(item: RelabelItem, model: str) -> dict:
    request = {k: v for k, v in item.request.items() if k in REQUEST_FIELDS and v is not None}
    return {**request, "model": model}


async def relabel_item(
    client: InferenceClient,
    batch: RelabelRequest,
    item: RelabelItem,
    *,
    attempts: int = 3,
    base_delay: float = 0.5,
) -> RelabelResult:
    """A new output for ``item``, or the reason it could not get one (never raises for model errors)."""
    result = RelabelResult(
        result_id=f"{batch.job_id}:{item.entry_id}",
        job_id=batch.job_id,
        project_id=batch.project_id,
        dataset_id=batch.dataset_id,
        entry_id=item.entry_id,
        base_revision=item.base_revision,
        model=batch.model,
    )
    for attempt in range(1, attempts + 1):
        try:
            completion = await client.complete(batch.project_id, _request_for(item, batch.model))
            result.output = completion_output(completion)
            return result
        except grpc.aio.AioRpcError as exc:
            if exc.code() in RETRYABLE and attempt < attempts:
                await asyncio.sleep(base_delay * 2 ** (attempt - 1) * (0.5 + random.random() / 2))
                continue
            result.error = f"{exc.code().name}: {exc.details()}"
            return result
        except ValueError as exc:
            result.error = str(exc)
            return result
    return result
