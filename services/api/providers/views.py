"""Provider settings routes (thin): provider keys, external providers, deployments.

Every route is scoped to the caller's project; another project's ids are simply not found.
Each write publishes its ``catalog.v1`` record before its transaction commits.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request, Response
from faststream.kafka import KafkaBroker
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.api.providers import service
from services.api.providers.models import (
    SLUG_PATTERN,
    Deleted,
    DeploymentList,
    DeploymentOut,
    DeploymentSpec,
    ExternalProviderCreate,
    ExternalProviderList,
    ExternalProviderOut,
    ExternalProviderUpdate,
    ProviderKeysOut,
    ProviderKeysUpdate,
)
from services.api.pruning import service as pruning
from services.common.auth import require_project
from services.common.catalog import CatalogReader
from services.common.events import CatalogRecord

router = APIRouter(tags=["providers"])

SlugPath = Annotated[str, Path(min_length=1, max_length=64, pattern=SLUG_PATTERN)]


@dataclass
class Catalog:
    """One request's view of the catalog: a transaction plus the records to publish before commit."""

    sessions: async_sessionmaker[AsyncSession]
    broker: KafkaBroker
    secret_key: bytes
    publish_timeout: float
    local: CatalogReader | None = None  # this process's view of catalog.v1 (the router's, in one process)
    pending: list[CatalogRecord] = field(default_factory=list)

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncSession]:
        async with self.sessions.begin() as session:
            yield session
            await service.publish(broker=self.broker, records=self.pending, timeout=self.publish_timeout)
        if self.local is not None:  # committed: the very next request here sees it (read your writes)
            for record in self.pending:
                self.local.apply(record)

    def publish(self, *records: CatalogRecord) -> None:
        self.pending.extend(records)


def catalog(request: Request) -> Catalog:
    state = request.app.state
    return Catalog(
        state.sessions, state.broker, state.secret_key, state.publish_timeout, getattr(state, "catalog", None)
    )


# --- provider keys ---------------------------------------------------------------------------


@router.get("/provider-keys", response_model=ProviderKeysOut)
async def get_provider_keys(
    c: Catalog = Depends(catalog), project_id: str = Depends(require_project)
) -> ProviderKeysOut:
    async with c.sessions() as session:
        row = await service.get_provider_keys(session=session, project_id=project_id)
    return service.provider_keys_out(row)


@router.put("/provider-keys", response_model=ProviderKeysOut)
async def put_provider_keys(
    body: ProviderKeysUpdate, c: Catalog = Depends(catalog), project_id: str = Depends(require_project)
) -> ProviderKeysOut:
    async with c.write() as session:
        row = await service.update_provider_keys(
            session=session, project_id=project_id, update=body, secret_key=c.secret_key
        )
        c.publish(service.provider_keys_record(row))
    return service.provider_keys_out(row)


# --- external providers ----------------------------------------------------------------------


@router.post("/external-providers", response_model=ExternalProviderOut, status_code=201)
async def create_external_provider(
    body: ExternalProviderCreate, c: Catalog = Depends(catalog), project_id: str = Depends(require_project)
) -> ExternalProviderOut:
    async with c.write() as session:
        provider = await service.create_provider(
            session=session, project_id=project_id, spec=body, secret_key=c.secret_key
        )
        c.publish(service.provider_record(provider))
    return service.provider_out(provider)


@router.get("/external-providers", response_model=ExternalProviderList)
async def list_external_providers(
    c: Catalog = Depends(catalog), project_id: str = Depends(require_project)
) -> ExternalProviderList:
    async with c.sessions() as session:
        providers = await service.list_providers(session=session, project_id=project_id)
    return ExternalProviderList(data=[service.provider_out(p) for p in providers])


@router.get("/external-providers/{provider_id}", response_model=ExternalProviderOut)
async def get_external_provider(
    provider_id: str, c: Catalog = Depends(catalog), project_id: str = Depends(require_project)
) -> ExternalProviderOut:
    async with c.sessions() as session:
        provider = await service.get_provider(session=session, project_id=project_id, provider_id=provider_id)
    return service.provider_out(provider)


@router.patch("/external-providers/{provider_id}", response_model=ExternalProviderOut)
async def update_external_provider(
    provider_id: str,
    body: ExternalProviderUpdate,
    c: Catalog = Depends(catalog),
    project_id: str = Depends(require_project),
) -> ExternalProviderOut:
    async with c.write() as session:
        provider = await service.update_provider(
            session=session,
            project_id=project_id,
            provider_id=provider_id,
            update=body,
            secret_key=c.secret_key,
        )
        c.publish(service.provider_record(provider))
    return service.provider_out(provider)


@router.delete("/external-providers/{provider_id}", response_model=Deleted)
async def delete_external_provider(
    provider_id: str, c: Catalog = Depends(catalog), project_id: str = Depends(require_project)
) -> Deleted:
    async with c.write() as session:
        c.publish(
            await service.delete_provider(session=session, project_id=project_id, provider_id=provider_id)
        )
    return Deleted(id=provider_id, object="external_provider")


# --- deployments -----------------------------------------------------------------------------


@router.put("/deployments/{slug}", response_model=DeploymentOut)
async def put_deployment(
    slug: SlugPath,
    body: DeploymentSpec,
    response: Response,
    c: Catalog = Depends(catalog),
    project_id: str = Depends(require_project),
) -> DeploymentOut:
    async with c.write() as session:
        copied = await pruning.rules_for_deployment(session=session, project_id=project_id, spec=body)
        deployment, created = await service.put_deployment(
            session=session,
            project_id=project_id,
            slug=slug,
            spec=body,
            secret_key=c.secret_key,
            pruning_rules=copied,
        )
        c.publish(service.deployment_record(deployment))
    response.status_code = 201 if created else 200
    return service.deployment_out(deployment)


@router.get("/deployments", response_model=DeploymentList)
async def list_deployments(
    c: Catalog = Depends(catalog), project_id: str = Depends(require_project)
) -> DeploymentList:
    async with c.sessions() as session:
        deployments = await service.list_deployments(session=session, project_id=project_id)
    return DeploymentList(data=[service.deployment_out(d) for d in deployments])


@router.get("/deployments/{slug}", response_model=DeploymentOut)
async def get_deployment(
    slug: SlugPath, c: Catalog = Depends(catalog), project_id: str = Depends(require_project)
) -> DeploymentOut:
    async with c.sessions() as session:
        deployment = await service.get_deployment(session=session, project_id=project_id, slug=slug)
    return service.deployment_out(deployment)


@router.delete("/deployments/{slug}", response_model=Deleted)
async def delete_deployment(
    slug: SlugPath, c: Catalog = Depends(catalog), project_id: str = Depends(require_project)
) -> Deleted:
    async with c.write() as session:
        c.publish(await service.delete_deployment(session=session, project_id=project_id, slug=slug))
    return Deleted(id=slug, object="deployment")
