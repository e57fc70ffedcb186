"""Deployments of fine-tuned models: a trained Model is ``PROVISIONING`` until its adapter answers a
probe on the server of its base, then ``DEPLOYED`` (or ``ERROR`` with the reason); a deleted Model's
adapter is unloaded.

Driven by ``catalog.v1``: the api follows the topic like every other reader, so a ``model`` record
that says PROVISIONING — published when training succeeds, or republished at start-up after a
crash mid-deployment — starts the deployment, and a tombstone retires it. The status changes in
the database only if the Model is still PROVISIONING with the same adapter (a deleted or retrained
model is left alone), and the new record is published inside that transaction.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from faststream.kafka import KafkaBroker
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.api.fine_tuning import service as fine_tuning
from services.api.fine_tuning.models import TrainingJob
from services.common.blobstore import BlobStore
from services.common.catalog import CatalogReader
from services.common.clock import now
from services.common.events import CatalogRecord
from services.common.settings import Settings
from services.serving.deploy import deploy_adapter, retire_adapter
from services.serving.vllm import ServerUnreachable, ServingError

log = logging.getLogger(__name__)

PROVISIONING = "PROVISIONING"


class Deployer:
    def __init__(
        self,
        *,
        sessions: async_sessionmaker[AsyncSession],
        broker: KafkaBroker,
        blobs: BlobStore,
        settings: Settings,
        catalog: CatalogReader | None = None,
        unreachable_retry_seconds: float = 600.0,
    ) -> None:
        self.catalog = catalog  # this process's catalog view: handed the new record (read your writes)
        self.sessions = sessions
        self.broker = broker
        self.blobs = blobs
        self.settings = settings
        self.unreachable_retry_seconds = unreachable_retry_seconds
        self._known: dict[str, dict[str, Any]] = {}  # model record id -> latest data
        self._tasks: dict[str, asyncio.Task] = {}
        self._running = False

    def start(self) -> None:
        self._running = True
        for record_id, data in self._known.items():
            self._maybe_deploy(record_id, data)

    async def stop(self) -> None:
        self._running = False
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        self._tasks.clear()

    def apply(self, record: CatalogRecord) -> None:
        """A ``catalog.v1`` handler: start deployments and retirements (never blocks the reader)."""
        if record.kind != fine_tuning.MODEL_KIND:
            return
        if record.deleted:
            previous = self._known.pop(record.id, None)
            if previous and previous.get("adapter_uri") and previous.get("provider") == "openpipe":
                self._spawn(f"retire:{record.id}", self._retire(previous))
            return
        self._known[record.id] = record.data
        if self._running:
            self._maybe_deploy(record.id, record.data)

    def _maybe_deploy(self, record_id: str, data: dict[str, Any]) -> None:
        if data.get("status") != PROVISIONING or data.get("provider") != "openpipe":
            return
        if not data.get("adapter_uri"):
            return
        key = f"deploy:{record_id}:{data['adapter_uri']}"
        if key not in self._tasks:
            self._spawn(key, self._deploy(data))

    def _spawn(self, key: str, work: Any) -> None:
        task = asyncio.create_task(work, name=key)
        self._tasks[key] = task
        task.add_done_callback(lambda _: self._tasks.pop(key, None))

    async def _deploy(self, data: dict[str, Any]) -> None:
        error = await self._try_deploy(data["base_model"], data["adapter_uri"])
        try:
            await self.finish(
                project_id=data["project_id"], slug=data["slug"], adapter_uri=data["adapter_uri"], error=error
            )
        except Exception:
            log.exception("recording the deployment of %s/%s failed", data["project_id"], data["slug"])

    async def _try_deploy(self, base_model: str, adapter_uri: str) -> str | None:
        """None once the adapter answers; else why not. An unreachable server is waited for."""
        deadline = time.monotonic() + self.unreachable_retry_seconds
        delay = 0.5
        while True:
            try:
                await deploy_adapter(
                    settings=self.settings, blobs=self.blobs, base_model=base_model, adapter_key=adapter_uri
                )
                return None
            except ServerUnreachable as exc:
                if time.monotonic() + delay > deadline:
                    return f"Deployment failed: {exc}"
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
            except ServingError as exc:
                return f"Deployment failed: {exc}"

    async def finish(self, *, project_id: str, slug: str, adapter_uri: str, error: str | None) -> None:
        async with self.sessions.begin() as session:
            model = await fine_tuning.find_model(session=session, project_id=project_id, slug=slug)
            if model is None or model.status != PROVISIONING or model.adapter_uri != adapter_uri:
                return
            model.status = "ERROR" if error else "DEPLOYED"
            model.error_message = error
            model.updated_at = now()
            job = await session.get(TrainingJob, model.job_id) if model.job_id else None
            if job is not None:
                message = error or f"Model {slug!r} deployed: its adapter answered a probe request."
                fine_tuning.add_event(session, job, message, level="error" if error else "info")
            records = [fine_tuning.model_record(model, job)]
            await fine_tuning.publish_records(
                broker=self.broker, records=records, timeout=self.settings.publish_timeout_seconds
            )
        if self.catalog is not None:
            for record in records:
                self.catalog.apply(record)
        log.info("model %s/%s is %s", project_id, slug, "ERROR: " + error if error else "DEPLOYED")

    async def _retire(self, data: dict[str, Any]) -> None:
        await retire_adapter(
            settings=self.settings,
            blobs=self.blobs,
            base_model=data["base_model"],
            adapter_key=data["adapter_uri"],
        )
