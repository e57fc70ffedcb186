"""Provider settings: per-project provider keys, external OpenAI/Azure-compatible providers and
their models, and deployments (fine-tuned models served by an OpenAI-compatible server).

Every secret column holds an AES-256-GCM token from ``services.common.secrets``, never plaintext;
no response schema below has a field that could carry one.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, field_validator
from sqlalchemy import JSON, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from services.common.db import Base

PROVIDER_NAMES = ("openai", "anthropic", "gemini")
PROVIDER_TYPES = ("openai", "azure")
SLUG_PATTERN = r"^[a-z0-9-]+$"
# Upstream model names as providers spell them: ``gpt-4o-2024-08-06``, ``deepseek-ai/DeepSeek-V3``.
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]*$"
MAX_INT32 = 2**31 - 1  # catalog integer columns are 32-bit on Postgres


# --- tables ----------------------------------------------------------------------------------


class ProviderKeys(Base):
    """The project's keys for the built-in providers (``openai:``, ``anthropic:``, ``gemini:``)."""

    __tablename__ = "provider_keys"

    project_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("projects.id", ondelete="CASCADE"), primary_key=True
    )
    openai_key_enc: Mapped[str | None] = mapped_column(Text, nullable=True)
    anthropic_key_enc: Mapped[str | None] = mapped_column(Text, nullable=True)
    gemini_key_enc: Mapped[str | None] = mapped_column(Text, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ExternalProvider(Base):
    """An OpenAI- or Azure-compatible endpoint, called as ``openpipe:<slug>/<model slug>``."""

    __tablename__ = "external_providers"
    __table_args__ = (UniqueConstraint("project_id", "slug", name="uq_external_providers_project_slug"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project_id: Mapped[str] = mapped_column(String(40), ForeignKey("projects.id", ondelete="CASCADE"))
    slug: Mapped[str] = mapped_column(String(64))
    type: Mapped[str] = mapped_column(String(16))
    base_url: Mapped[str] = mapped_column(String(2048))
    api_key_enc: Mapped[str | None] = mapped_column(Text, nullable=True)
    api_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    models: Mapped[list[ExternalModel]] = relationship(
        back_populates="provider",
        cascade="all, delete-orphan",
        passive_deletes=True,
        lazy="selectin",
        order_by="ExternalModel.position",
    )


class ExternalModel(Base):
    __tablename__ = "external_models"
    __table_args__ = (UniqueConstraint("provider_id", "slug", name="uq_external_models_provider_slug"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    provider_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("external_providers.id", ondelete="CASCADE"), index=True
    )
    slug: Mapped[str] = mapped_column(String(200))
    position: Mapped[int] = mapped_column(Integer, default=0)  # keeps the order the client gave
    context_window: Mapped[int | None] = mapped_column(Integer, nullable=True)
    input_price_per_million: Mapped[float | None] = mapped_column(Float, nullable=True)
    output_price_per_million: Mapped[float | None] = mapped_column(Float, nullable=True)

    provider: Mapped[ExternalProvider] = relationship(back_populates="models")


class Deployment(Base):
    """A fine-tuned model (``openpipe:<slug>``) served by an OpenAI-compatible server (vLLM + LoRA)."""

    __tablename__ = "deployments"
    __table_args__ = (UniqueConstraint("project_id", "slug", name="uq_deployments_project_slug"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project_id: Mapped[str] = mapped_column(String(40), ForeignKey("projects.id", ondelete="CASCADE"))
    slug: Mapped[str] = mapped_column(String(64))
    base_url: Mapped[str] = mapped_column(String(2048))
    upstream_model: Mapped[str] = mapped_column(String(200))
    api_key_enc: Mapped[str | None] = mapped_column(Text, nullable=True)
    pruning_rules: Mapped[list[str]] = mapped_column(JSON, default=list)  # applied in this order
    default_temperature: Mapped[float | None] = mapped_column(Float, nullable=True)
    input_price_per_million: Mapped[float | None] = mapped_column(Float, nullable=True)
    output_price_per_million: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


# --- request bodies (camelCase, as clients send them) ----------------------------------------


def _check_base_url(value: str) -> str:
    """An http(s) URL with a host and nothing secret in it. Errors never echo the value."""
    if any(c.isspace() for c in value):
        raise ValueError("must not contain whitespace")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018  (raises on a malformed port)
    except ValueError:
        raise ValueError("must be a valid http:// or https:// URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host, e.g. https://api.example.com/v1")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not contain credentials; send the key as apiKey")
    if parts.query or parts.fragment:
        raise ValueError("must not contain a query string or fragment")
    return value.rstrip("/")


def _not_null(value: Any) -> Any:
    if value is None:
        raise ValueError("cannot be null")
    return value


Slug = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=SLUG_PATTERN)]
ModelName = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=MODEL_NAME_PATTERN)]
BaseUrl = Annotated[str, StringConstraints(min_length=1, max_length=2048), AfterValidator(_check_base_url)]
SecretValue = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=4096)]
ApiVersion = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64)]
Price = Annotated[float, Field(ge=0, allow_inf_nan=False)]
PruningRule = Annotated[str, StringConstraints(min_length=1, max_length=65536)]


class ProviderKeysUpdate(BaseModel):
    """``PUT /provider-keys``: an absent field is left as it is, ``null`` removes the key."""

    model_config = ConfigDict(extra="forbid")

    openai: SecretValue | None = None
    anthropic: SecretValue | None = None
    gemini: SecretValue | None = None


class ExternalModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    slug: ModelName
    contextWindow: int | None = Field(default=None, gt=0, le=MAX_INT32)
    inputPricePerMillion: Price | None = None
    outputPricePerMillion: Price | None = None


def _unique_model_slugs(models: list[ExternalModelSpec] | None) -> list[ExternalModelSpec] | None:
    seen: set[str] = set()
    for model in models or []:
        if model.slug in seen:
            raise ValueError(f"duplicate model slug {model.slug!r}")
        seen.add(model.slug)
    return models


class ExternalProviderCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    slug: Slug
    type: Literal["openai", "azure"]
    baseUrl: BaseUrl
    apiKey: SecretValue | None = None
    apiVersion: ApiVersion | None = None  # required for azure (checked by the service)
    models: list[ExternalModelSpec] = Field(default_factory=list, max_length=500)

    _models = field_validator("models")(_unique_model_slugs)


class ExternalProviderUpdate(BaseModel):
    """``PATCH``: absent fields are unchanged; ``apiKey``/``apiVersion`` ``null`` removes them."""

    model_config = ConfigDict(extra="forbid")

    baseUrl: BaseUrl | None = None
    apiKey: SecretValue | None = None
    apiVersion: ApiVersion | None = None
    models: list[ExternalModelSpec] | None = Field(default=None, max_length=500)

    _required = field_validator("baseUrl", "models", mode="before")(_not_null)
    _models = field_validator("models")(_unique_model_slugs)


class DeploymentSpec(BaseModel):
    """``PUT /deployments/{slug}``: replaces the deployment, except that an absent ``apiKey`` keeps
    the stored key (it cannot be read back to resend); ``apiKey: null`` removes it."""

    model_config = ConfigDict(extra="forbid")

    baseUrl: BaseUrl
    model: ModelName = Field(description="the model name the upstream server expects")
    apiKey: SecretValue | None = None
    pruningRules: list[PruningRule] = Field(default_factory=list, max_length=100)
    # Instead of texts: copy a dataset's pruning rules (all, or those named, in the dataset's order)
    # as they are now; later edits of the dataset's rules do not change the deployment.
    datasetId: str | None = Field(default=None, min_length=1, max_length=40)
    pruningRuleIds: list[str] | None = Field(default=None, max_length=100)
    defaultTemperature: float | None = Field(default=None, ge=0, le=2, allow_inf_nan=False)
    inputPricePerMillion: Price | None = None
    outputPricePerMillion: Price | None = None


# --- responses (never a secret: only whether one is set) -------------------------------------


class KeyStatus(BaseModel):
    configured: bool


class ProviderKeysOut(BaseModel):
    object: Literal["provider_keys"] = "provider_keys"
    openai: KeyStatus
    anthropic: KeyStatus
    gemini: KeyStatus


class ExternalModelOut(BaseModel):
    slug: str
    contextWindow: int | None
    inputPricePerMillion: float | None
    outputPricePerMillion: float | None


class ExternalProviderOut(BaseModel):
    object: Literal["external_provider"] = "external_provider"
    id: str
    slug: str
    type: str
    baseUrl: str
    apiVersion: str | None
    hasApiKey: bool
    models: list[ExternalModelOut]
    created: str
    updated: str


class ExternalProviderList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ExternalProviderOut]


class DeploymentOut(BaseModel):
    object: Literal["deployment"] = "deployment"
    id: str = Field(description="the slug: call it as model 'openpipe:<id>'")
    slug: str
    baseUrl: str
    model: str
    hasApiKey: bool
    pruningRules: list[str]
    defaultTemperature: float | None
    inputPricePerMillion: float | None
    outputPricePerMillion: float | None
    created: str
    updated: str


class DeploymentList(BaseModel):
    object: Literal["list"] = "list"
    data: list[DeploymentOut]


class Deleted(BaseModel):
    id: str
    object: str
    deleted: Literal[True] = True
