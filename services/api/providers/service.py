"""Provider settings: plain functions over a session, plus their records on ``catalog.v1``.

Secrets are sealed with ``services.common.secrets.encrypt_secret`` before they reach the
session, and travel sealed on ``catalog.v1``: a consumer opens them with ``decrypt_secret`` and
the deployment's key (``load_or_create_key(settings)``). No response and no log line carries one.

Records on ``catalog.v1`` (``CatalogRecord``; Kafka key = ``record.key`` = ``"<kind>/<id>"``,
latest value wins; ``enc`` = an ``encrypt_secret`` token or ``None`` when unset). Consumers
(the router) rely on these exact shapes:

``provider_keys`` — the project's keys for ``openai:``/bare OpenAI, ``anthropic:``, ``gemini:``::

    kind="provider_keys", id=<project_id>, deleted=False,
    data={"project_id": str, "openai": enc, "anthropic": enc, "gemini": enc}

``external_provider`` — called as ``openpipe:<slug>/<model slug>``; ``type`` is ``"openai"``
(POST ``<base_url>/chat/completions``) or ``"azure"`` (``api_version`` always set)::

    kind="external_provider", id=<provider id>, deleted=False,
    data={"project_id": str, "slug": str, "type": "openai" | "azure", "base_url": str,
          "api_key": enc, "api_version": str | None,
          "models": [{"slug": str, "context_window": int | None,
                      "input_price_per_million": float | None,
                      "output_price_per_million": float | None}, ...]}
    deleted: kind="external_provider", id=<provider id>, deleted=True,
             data={"project_id": str, "slug": str}

``deployment`` — a fine-tuned model ``openpipe:<slug>`` served by an OpenAI-compatible server
(vLLM with a LoRA adapter): call ``<base_url>/chat/completions`` with ``model=upstream_model``,
apply ``pruning_rules`` in order, use ``default_temperature`` when the request has none::

    kind="deployment", id="<project_id>/<slug>", deleted=False,
    data={"project_id": str, "slug": str, "base_url": str, "upstream_model": str,
          "api_key": enc, "pruning_rules": [str, ...], "default_temperature": float | None,
          "input_price_per_million": float | None, "output_price_per_million": float | None}
    deleted: kind="deployment", id="<project_id>/<slug>", deleted=True,
             data={"project_id": str, "slug": str}

``base_url`` never ends with ``/`` and never contains credentials, a query or a fragment.
Every record is republished when ``api`` starts (Tansu keeps nothing across restarts).

Writes publish their records inside the database transaction, after the rows are written and
locked and before the commit: if the broker cannot take them the change is rolled back (503),
and concurrent writers to one row publish in commit order.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from faststream.kafka import KafkaBroker
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from services.api.providers.models import (
    PROVIDER_NAMES,
    Deployment,
    DeploymentOut,
    DeploymentSpec,
    ExternalModel,
    ExternalModelOut,
    ExternalModelSpec,
    ExternalProvider,
    ExternalProviderCreate,
    ExternalProviderOut,
    ExternalProviderUpdate,
    KeyStatus,
    ProviderKeys,
    ProviderKeysOut,
    ProviderKeysUpdate,
)
from services.common.clock import iso, now
from services.common.errors import APIError, bad_request, not_found, unavailable
from services.common.events import CATALOG_TOPIC, CatalogRecord
from services.common.ids import new_id
from services.common.secrets import SecretError, decrypt_secret, encrypt_secret

log = logging.getLogger(__name__)

PROVIDER_KEYS_KIND = "provider_keys"
EXTERNAL_PROVIDER_KIND = "external_provider"
DEPLOYMENT_KIND = "deployment"


def _seal(value: str | None, key: bytes) -> str | None:
    return None if value is None else encrypt_secret(value, key)


def conflict(message: str, *, param: str) -> APIError:
    return APIError(409, message, param=param, code="conflict")


# --- provider keys ---------------------------------------------------------------------------


async def get_provider_keys(*, session: AsyncSession, project_id: str) -> ProviderKeys | None:
    return await session.get(ProviderKeys, project_id)


async def update_provider_keys(
    *, session: AsyncSession, project_id: str, update: ProviderKeysUpdate, secret_key: bytes
) -> ProviderKeys:
    """Apply the fields present in ``update`` (``None`` removes a key); others stay as they are."""
    row = await session.get(ProviderKeys, project_id, with_for_update=True)
    if row is None:
        row = ProviderKeys(project_id=project_id)
        session.add(row)
    for name in PROVIDER_NAMES:
        if name in update.model_fields_set:
            setattr(row, f"{name}_key_enc", _seal(getattr(update, name), secret_key))
    row.updated_at = now()
    try:
        await session.flush()
    except IntegrityError:
        raise conflict("The provider keys were changed concurrently; retry.", param="body") from None
    return row


def provider_keys_out(row: ProviderKeys | None) -> ProviderKeysOut:
    def status(name: str) -> KeyStatus:
        return KeyStatus(configured=row is not None and getattr(row, f"{name}_key_enc") is not None)

    return ProviderKeysOut(openai=status("openai"), anthropic=status("anthropic"), gemini=status("gemini"))


def provider_keys_record(row: ProviderKeys) -> CatalogRecord:
    data: dict[str, object] = {"project_id": row.project_id}
    data.update({name: getattr(row, f"{name}_key_enc") for name in PROVIDER_NAMES})
    return CatalogRecord(kind=PROVIDER_KEYS_KIND, id=row.project_id, data=data)


# --- external providers ----------------------------------------------------------------------


def _models(specs: list[ExternalModelSpec]) -> list[ExternalModel]:
    return [
        ExternalModel(
            id=new_id("emod"),
            slug=spec.slug,
            position=position,
            context_window=spec.contextWindow,
            input_price_per_million=spec.inputPricePerMillion,
            output_price_per_million=spec.outputPricePerMillion,
        )
        for position, spec in enumerate(specs)
    ]


def _require_api_version(type_: str, api_version: str | None) -> None:
    if type_ == "azure" and api_version is None:
        raise bad_request(
            'apiVersion is required for an azure provider (for example "2024-06-01").', param="apiVersion"
        )


async def list_providers(*, session: AsyncSession, project_id: str) -> list[ExternalProvider]:
    query = (
        select(ExternalProvider)
        .where(ExternalProvider.project_id == project_id)
        .order_by(ExternalProvider.created_at, ExternalProvider.id)
    )
    return list(await session.scalars(query))


async def get_provider(
    *, session: AsyncSession, project_id: str, provider_id: str, for_update: bool = False
) -> ExternalProvider:
    """The project's provider; a 404 for an unknown id or another project's."""
    query = select(ExternalProvider).where(
        ExternalProvider.id == provider_id, ExternalProvider.project_id == project_id
    )
    if for_update:
        query = query.with_for_update()
    provider = await session.scalar(query)
    if provider is None:
        raise not_found(f"No external provider with id '{provider_id}'.", param="id")
    return provider


async def create_provider(
    *, session: AsyncSession, project_id: str, spec: ExternalProviderCreate, secret_key: bytes
) -> ExternalProvider:
    _require_api_version(spec.type, spec.apiVersion)
    taken = select(ExternalProvider.id).where(
        ExternalProvider.project_id == project_id, ExternalProvider.slug == spec.slug
    )
    if await session.scalar(taken) is not None:
        raise conflict(f"An external provider with slug '{spec.slug}' already exists.", param="slug")
    moment = now()
    provider = ExternalProvider(
        id=new_id("prov"),
        project_id=project_id,
        slug=spec.slug,
        type=spec.type,
        base_url=spec.baseUrl,
        api_key_enc=_seal(spec.apiKey, secret_key),
        api_version=spec.apiVersion,
        created_at=moment,
        updated_at=moment,
        models=_models(spec.models),
    )
    session.add(provider)
    try:
        await session.flush()
    except IntegrityError:  # lost a race for the slug
        raise conflict(
            f"An external provider with slug '{spec.slug}' already exists.", param="slug"
        ) from None
    return provider


async def update_provider(
    *,
    session: AsyncSession,
    project_id: str,
    provider_id: str,
    update: ExternalProviderUpdate,
    secret_key: bytes,
) -> ExternalProvider:
    provider = await get_provider(
        session=session, project_id=project_id, provider_id=provider_id, for_update=True
    )
    given = update.model_fields_set
    api_version = update.apiVersion if "apiVersion" in given else provider.api_version
    _require_api_version(provider.type, api_version)
    provider.api_version = api_version
    if update.baseUrl is not None:
        provider.base_url = update.baseUrl
    if "apiKey" in given:
        provider.api_key_enc = _seal(update.apiKey, secret_key)
    if update.models is not None:
        provider.models.clear()
        await session.flush()  # delete the old rows before inserting ones that may reuse their slugs
        provider.models.extend(_models(update.models))
    provider.updated_at = now()
    await session.flush()
    return provider


async def delete_provider(*, session: AsyncSession, project_id: str, provider_id: str) -> CatalogRecord:
    """Delete the provider and its models; returns the tombstone to publish."""
    provider = await get_provider(
        session=session, project_id=project_id, provider_id=provider_id, for_update=True
    )
    tombstone = CatalogRecord(
        kind=EXTERNAL_PROVIDER_KIND,
        id=provider.id,
        deleted=True,
        data={"project_id": provider.project_id, "slug": provider.slug},
    )
    await session.delete(provider)
    await session.flush()
    return tombstone


def provider_out(provider: ExternalProvider) -> ExternalProviderOut:
    return ExternalProviderOut(
        id=provider.id,
        slug=provider.slug,
        type=provider.type,
        baseUrl=provider.base_url,
        apiVersion=provider.api_version,
        hasApiKey=provider.api_key_enc is not None,
        models=[
            ExternalModelOut(
                slug=m.slug,
                contextWindow=m.context_window,
                inputPricePerMillion=m.input_price_per_million,
                outputPricePerMillion=m.output_price_per_million,
            )
            for m in provider.models
        ],
        created=iso(provider.created_at),
        updated=iso(provider.updated_at),
    )


def provider_record(provider: ExternalProvider) -> CatalogRecord:
    return CatalogRecord(
        kind=EXTERNAL_PROVIDER_KIND,
        id=provider.id,
        data={
            "project_id": provider.project_id,
            "slug": provider.slug,
            "type": provider.type,
            "base_url": provider.base_url,
            "api_key": provider.api_key_enc,
            "api_version": provider.api_version,
            "models": [
                {
                    "slug": m.slug,
                    "context_window": m.context_window,
                    "input_price_per_million": m.input_price_per_million,
                    "output_price_per_million": m.output_price_per_million,
                }
                for m in provider.models
            ],
        },
    )


# --- deployments -----------------------------------------------------------------------------


async def list_deployments(*, session: AsyncSession, project_id: str) -> list[Deployment]:
    query = select(Deployment).where(Deployment.project_id == project_id).order_by(Deployment.slug)
    return list(await session.scalars(query))


async def get_deployment(
    *, session: AsyncSession, project_id: str, slug: str, for_update: bool = False
) -> Deployment:
    query = select(Deployment).where(Deployment.project_id == project_id, Deployment.slug == slug)
    if for_update:
        query = query.with_for_update()
    deployment = await session.scalar(query)
    if deployment is None:
        raise not_found(f"No deployment with slug '{slug}'.", param="slug")
    return deployment


async def put_deployment(
    *,
    session: AsyncSession,
    project_id: str,
    slug: str,
    spec: DeploymentSpec,
    secret_key: bytes,
    pruning_rules: list[str] | None = None,
) -> tuple[Deployment, bool]:
    """Create or replace ``openpipe:<slug>``; returns it and whether it was created.

    Every field is replaced except ``apiKey``: absent keeps the stored key, ``null`` removes it.
    ``pruning_rules`` (texts copied from a dataset's rules) replaces ``spec.pruningRules`` when given.
    """
    query = (
        select(Deployment)
        .where(Deployment.project_id == project_id, Deployment.slug == slug)
        .with_for_update()
    )
    deployment = await session.scalar(query)
    created = deployment is None
    moment = now()
    if deployment is None:
        deployment = Deployment(id=new_id("depl"), project_id=project_id, slug=slug, created_at=moment)
        session.add(deployment)
    deployment.base_url = spec.baseUrl
    deployment.upstream_model = spec.model
    if "apiKey" in spec.model_fields_set:
        deployment.api_key_enc = _seal(spec.apiKey, secret_key)
    deployment.pruning_rules = list(spec.pruningRules if pruning_rules is None else pruning_rules)
    deployment.default_temperature = spec.defaultTemperature
    deployment.input_price_per_million = spec.inputPricePerMillion
    deployment.output_price_per_million = spec.outputPricePerMillion
    deployment.updated_at = moment
    try:
        await session.flush()
    except IntegrityError:  # lost a race to create the same slug
        raise conflict(f"The deployment '{slug}' was changed concurrently; retry.", param="slug") from None
    return deployment, created


async def delete_deployment(*, session: AsyncSession, project_id: str, slug: str) -> CatalogRecord:
    deployment = await get_deployment(session=session, project_id=project_id, slug=slug, for_update=True)
    await session.delete(deployment)
    await session.flush()
    return CatalogRecord(
        kind=DEPLOYMENT_KIND,
        id=f"{project_id}/{slug}",
        deleted=True,
        data={"project_id": project_id, "slug": slug},
    )


def deployment_out(deployment: Deployment) -> DeploymentOut:
    return DeploymentOut(
        id=deployment.slug,
        slug=deployment.slug,
        baseUrl=deployment.base_url,
        model=deployment.upstream_model,
        hasApiKey=deployment.api_key_enc is not None,
        pruningRules=list(deployment.pruning_rules or []),
        defaultTemperature=deployment.default_temperature,
        inputPricePerMillion=deployment.input_price_per_million,
        outputPricePerMillion=deployment.output_price_per_million,
        created=iso(deployment.created_at),
        updated=iso(deployment.updated_at),
    )


def deployment_record(deployment: Deployment) -> CatalogRecord:
    return CatalogRecord(
        kind=DEPLOYMENT_KIND,
        id=f"{deployment.project_id}/{deployment.slug}",
        data={
            "project_id": deployment.project_id,
            "slug": deployment.slug,
            "base_url": deployment.base_url,
            "upstream_model": deployment.upstream_model,
            "api_key": deployment.api_key_enc,
            "pruning_rules": list(deployment.pruning_rules or []),
            "default_temperature": deployment.default_temperature,
            "input_price_per_million": deployment.input_price_per_million,
            "output_price_per_million": deployment.output_price_per_million,
        },
    )


# --- the whole catalog, for republication at start-up ----------------------------------------


async def catalog_records(*, session: AsyncSession) -> list[CatalogRecord]:
    """Every live provider-settings record, in a stable order."""
    keys = await session.scalars(select(ProviderKeys).order_by(ProviderKeys.project_id))
    providers = await session.scalars(select(ExternalProvider).order_by(ExternalProvider.id))
    deployments = await session.scalars(select(Deployment).order_by(Deployment.id))
    return [
        *(provider_keys_record(row) for row in keys),
        *(provider_record(p) for p in providers),
        *(deployment_record(d) for d in deployments),
    ]


def sealed_values(records: Iterable[CatalogRecord]) -> list[str]:
    values: list[str] = []
    for record in records:
        if record.kind == PROVIDER_KEYS_KIND:
            values += [record.data[name] for name in PROVIDER_NAMES if record.data.get(name)]
        elif record.data.get("api_key"):
            values.append(record.data["api_key"])
    return values


def count_unreadable(records: Iterable[CatalogRecord], secret_key: bytes) -> int:
    """How many sealed secrets this key cannot open (a replaced or lost key)."""
    unreadable = 0
    for token in sealed_values(records):
        try:
            decrypt_secret(token, secret_key)
        except SecretError:
            unreadable += 1
    return unreadable


async def publish(*, broker: KafkaBroker, records: Iterable[CatalogRecord], timeout: float) -> None:
    """Publish on ``catalog.v1`` and wait for each ack; a 503 if the broker cannot take them."""
    for record in records:
        try:
            async with asyncio.timeout(timeout):
                await broker.publish(record.model_dump(mode="json"), CATALOG_TOPIC, key=record.key.encode())
        except Exception as exc:
            log.warning("publishing catalog record %s failed: %s", record.key, type(exc).__name__)
            raise unavailable(
                "The change was not saved: the event broker is unavailable. Retry later."
            ) from exc
