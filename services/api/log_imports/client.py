"""The api's side of ingest's gRPC ``LogQuery`` for imports: the channel, the internal caller's
metadata, the filters as ingest takes them, and the pool of processes that convert batches."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass, field

import grpc

from services.api.log_imports.schemas import ImportFilters
from services.common import tracing
from services.common.auth import INTERNAL_TOKEN_HEADER, PROJECT_HEADER
from services.common.grpc.distillery.v1 import logs_pb2

MAX_WORKERS = 4
GRPC_MAX_MESSAGE = 64 * 1024 * 1024  # a batch, or one log with 8 MiB payloads raw and normalized
SEARCH_BATCHES = "/distillery.v1.LogQuery/SearchBatches"


def default_workers() -> int:
    """Conversion processes when not configured: the CPUs left over by the api, at most 4."""
    return max(1, min(MAX_WORKERS, (os.cpu_count() or 2) - 1))


@dataclass
class LogImporter:
    """What the api needs to import logs: ingest's ``LogQuery`` address, the internal token, and
    how many worker processes convert logs into rows (0: in the event loop)."""

    address: str
    token: str = field(repr=False)
    workers: int = 0
    _pool: ProcessPoolExecutor | None = field(default=None, repr=False)

    def metadata(self, project_id: str) -> tuple[tuple[str, str], ...]:
        return ((INTERNAL_TOKEN_HEADER, self.token), (PROJECT_HEADER, project_id))

    def channel(self) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(
            self.address,
            interceptors=[tracing.ClientTracing()],
            options=[
                ("grpc.max_receive_message_length", GRPC_MAX_MESSAGE),
                ("grpc.max_send_message_length", GRPC_MAX_MESSAGE),
            ],
        )

    def executor(self) -> Executor | None:
        """The conversion pool, started on first use (``spawn``: safe beside gRPC's threads)."""
        if self.workers <= 0:
            return None
        if self._pool is None:
            context = multiprocessing.get_context("spawn")
            self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=context)
        return self._pool

    def discard_pool(self) -> None:
        """After a worker died: the next import starts a fresh pool."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await asyncio.to_thread(pool.shutdown, True, cancel_futures=True)


def grpc_filters(filters: ImportFilters) -> logs_pb2.LogFilters:
    return logs_pb2.LogFilters(
        model=filters.model,
        completion_id=filters.completionId,
        status=filters.status,
        requested_after_ms=filters.requestedAfter,
        requested_before_ms=filters.requestedBefore,
        metadata=filters.metadata,
        request_contains=filters.requestContains,
        response_not_contains=filters.responseNotContains,
    )


def rpc_problem(exc: grpc.aio.AioRpcError) -> str:
    if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
        return (
            "ingest refused the api's internal token: every process of one install needs the same "
            "DISTILLERY_INTERNAL_TOKEN (or DISTILLERY_SECRET_KEY)"
        )
    if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
        return f"invalid filters: {exc.details()}"
    return f"the request logs could not be read ({exc.code().name}); run the import again to resume"
