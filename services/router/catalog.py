"""What the router knows about each project, materialized from ``catalog.v1``.

Record shapes (published by ``api``, see ``services/api/providers/service.py``):
``provider_keys`` (id = project id), ``external_provider`` (id = provider id) and
``deployment`` (id = ``project_id/slug``: a fine-tuned model served by an
OpenAI-compatible server) and ``model`` (id = ``project_id/slug``: a Model of the fine-tuning
api, see ``services/api/fine_tuning/service.py``; served by the model server or vLLM for its base).
Secrets arrive encrypted and are decrypted on first use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from services.common.events import CatalogRecord
from services.common.secrets import decrypt_secret


@dataclass(frozen=True)
class ExternalModel:
    slug: str
    input_price_per_million: float | None = None
    output_price_per_million: float | None = None


@dataclass(frozen=True)
class ExternalProvider:
    id: str
    project_id: str
    slug: str
    type: str  # "openai" | "azure"
    base_url: str
    api_key_enc: str | None
    api_version: str | None
    models: dict[str, ExternalModel] = field(default_factory=dict)


@dataclass(frozen=True)
class Deployment:
    project_id: str
    slug: str
    base_url: str
    upstream_model: str
    api_key_enc: str | None
    pruning_rules: tuple[str, ...] = ()
    default_temperature: float | None = None
    input_price_per_million: float | None = None
    output_price_per_million: float | None = None


@dataclass(frozen=True)
class FineTunedModel:
    """A Model from the fine-tuning api: served once DEPLOYED (see ``routing.ModelResolver``)."""

    project_id: str
    slug: str
    status: str
    provider: str  # "openpipe" (our adapter on its base) | "openai" (an ``ft:`` model at OpenAI)
    base_model: str
    adapter_uri: str | None = None
    upstream_model: str | None = None
    pruning_rules: tuple[str, ...] = ()
    default_temperature: float | None = None
    input_price_per_million: float | None = None
    output_price_per_million: float | None = None


def _fine_tuned_model(data: dict[str, Any]) -> FineTunedModel:
    return FineTunedModel(
        project_id=data["project_id"],
        slug=data["slug"],
        status=str(data.get("status") or "PENDING"),
        provider=str(data.get("provider") or "openpipe"),
        base_model=str(data.get("base_model") or ""),
        adapter_uri=data.get("adapter_uri"),
        upstream_model=data.get("upstream_model"),
        pruning_rules=tuple(data.get("pruning_rules") or ()),
        default_temperature=data.get("default_temperature"),
        input_price_per_million=data.get("input_price_per_million"),
        output_price_per_million=data.get("output_price_per_million"),
    )


def _external_provider(record: CatalogRecord) -> ExternalProvider:
    d = record.data
    models = {
        m["slug"]: ExternalModel(
            m["slug"], m.get("input_price_per_million"), m.get("output_price_per_million")
        )
        for m in d.get("models") or []
    }
    return ExternalProvider(
        id=record.id,
        project_id=d["project_id"],
        slug=d["slug"],
        type=d.get("type", "openai"),
        base_url=d["base_url"],
        api_key_enc=d.get("api_key"),
        api_version=d.get("api_version"),
        models=models,
    )


def _deployment(data: dict[str, Any]) -> Deployment:
    return Deployment(
        project_id=data["project_id"],
        slug=data["slug"],
        base_url=data["base_url"],
        upstream_model=data["upstream_model"],
        api_key_enc=data.get("api_key"),
        pruning_rules=tuple(data.get("pruning_rules") or ()),
        default_temperature=data.get("default_temperature"),
        input_price_per_million=data.get("input_price_per_million"),
        output_price_per_million=data.get("output_price_per_million"),
    )


class RouterCatalog:
    def __init__(self, secret_key: bytes) -> None:
        self._secret_key = secret_key
        self._provider_keys: dict[str, dict[str, str | None]] = {}
        self._external: dict[str, ExternalProvider] = {}  # by provider id
        self._external_by_slug: dict[tuple[str, str], ExternalProvider] = {}
        self._deployments: dict[tuple[str, str], Deployment] = {}
        self._models: dict[tuple[str, str], FineTunedModel] = {}
        self._plain: dict[str, str] = {}

    def apply(self, record: CatalogRecord) -> None:
        if record.kind == "provider_keys":
            self._apply_provider_keys(record)
        elif record.kind == "external_provider":
            self._apply_external(record)
        elif record.kind == "deployment":
            self._apply_deployment(record)
        elif record.kind == "model":
            self._apply_model(record)

    def _apply_provider_keys(self, record: CatalogRecord) -> None:
        if record.deleted:
            self._provider_keys.pop(record.id, None)
        else:
            self._provider_keys[record.id] = {
                p: record.data.get(p) for p in ("openai", "anthropic", "gemini")
            }

    def _apply_external(self, record: CatalogRecord) -> None:
        old = self._external.pop(record.id, None)
        if old is not None:
            self._external_by_slug.pop((old.project_id, old.slug), None)
        if not record.deleted:
            provider = _external_provider(record)
            self._external[record.id] = provider
            self._external_by_slug[(provider.project_id, provider.slug)] = provider

    def _apply_deployment(self, record: CatalogRecord) -> None:
        project_id, _, slug = record.id.partition("/")
        if record.deleted:
            self._deployments.pop((project_id, slug), None)
        else:
            self._deployments[(project_id, slug)] = _deployment(record.data)

    def _apply_model(self, record: CatalogRecord) -> None:
        project_id, _, slug = record.id.partition("/")
        if record.deleted:
            self._models.pop((project_id, slug), None)
        else:
            self._models[(project_id, slug)] = _fine_tuned_model(record.data)

    def decrypt(self, token: str | None) -> str | None:
        if token is None:
            return None
        if token not in self._plain:
            self._plain[token] = decrypt_secret(token, self._secret_key)
        return self._plain[token]

    def provider_key(self, project_id: str, provider: str) -> str | None:
        return self.decrypt((self._provider_keys.get(project_id) or {}).get(provider))

    def external_provider(self, project_id: str, slug: str) -> ExternalProvider | None:
        return self._external_by_slug.get((project_id, slug))

    def deployment(self, project_id: str, slug: str) -> Deployment | None:
        return self._deployments.get((project_id, slug))

    def fine_tuned_model(self, project_id: str, slug: str) -> FineTunedModel | None:
        return self._models.get((project_id, slug))
