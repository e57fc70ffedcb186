"""Fine-tuning: plain keyword-only functions over a session (and the broker, for what must be sent).

Creating a model (``POST /models``) or a job (``POST /fine_tuning/jobs``) is one path,
``start_training``: freeze the data as a content-addressed snapshot, resolve hyperparameters,
write the Model and its TrainingJob, and publish the ``TrainingRequest`` on
``training.requests.v1`` before the transaction commits (a refused publish rolls everything back:
a 2xx means the trainer will see it). Provider ``openai`` runs in ``openai_provider`` instead.

``apply_event`` applies ``training.events.v1`` once per ``seq`` and returns the catalog records to
publish. Statuses: Model ``PENDING → QUEUED → TRAINING → DEPLOYED`` (or ``ERROR``), job
``validating_files → queued → running (⇄ paused) → succeeded | failed | cancelled``.

Catalog record for the router and serving (``catalog.v1``, key ``model/<project_id>/<slug>``)::

    kind="model", id="<project_id>/<slug>", deleted=False,
    data={"project_id", "slug", "model_id", "job_id", "status" (Model status),
          "provider": "openpipe" | "openai", "base_model" (model-store name, or the OpenAI base),
          "requested_base_model" (as sent: may be a parent model's slug),
          "adapter_uri" (blob key of the final adapter folder; None until trained),
          "upstream_model" (provider openai: the "ft:..." model; else None),
          "pruning_rules": [text, ...], "default_temperature": float | None,
          "input_price_per_million", "output_price_per_million", "context_window",
          "max_completion_tokens"}
    deleted: kind="model", id="<project_id>/<slug>", deleted=True, data={"project_id", "slug"}
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from faststream.kafka import KafkaBroker
from pydantic import BaseModel, ValidationError
from sqlalchemy import Text, and_, cast, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from services.api.dataset_files.service import (
    create_snapshot,
    pruning_rule_texts,
    snapshot_key,
    snapshot_lock,
)
from services.api.datasets.models import Dataset, DatasetEntry
from services.api.datasets.service import dataset_stats, get_dataset
from services.api.fine_tuning import catalog, files
from services.api.fine_tuning.models import FineTunedModel, JobCheckpoint, JobEvent, TrainingJob
from services.api.fine_tuning.schemas import (
    TERMINAL_JOB_STATUSES,
    FlatHyperparameters,
    JobCreate,
    OpenAIFlatHyperparameters,
    OpenAIPreferenceHyperparameters,
    OpenAISftHyperparameters,
    PreferenceHyperparameters,
    SftHyperparameters,
    TrainingConfig,
)
from services.api.pruning.models import PruningRule
from services.common.blobstore import BlobStore, BlobStoreError
from services.common.catalog import CatalogReader
from services.common.clock import iso, now
from services.common.db import lock_row
from services.common.errors import APIError, bad_request, invalid_input, not_found, unavailable
from services.common.events import (
    CATALOG_TOPIC,
    TRAINING_REQUESTS_TOPIC,
    CatalogRecord,
    TrainingEvent,
    TrainingHyperparameters,
    TrainingRequest,
)
from services.common.ids import new_id
from services.common.model_store import model_blob_prefix

log = logging.getLogger(__name__)

MODEL_KIND = "model"
JOB_TO_MODEL_STATUS = {
    "validating_files": "PENDING",
    "queued": "QUEUED",
    "running": "TRAINING",
    "paused": "TRAINING",
    "failed": "ERROR",
    "cancelled": "ERROR",
}


def unix(moment: datetime) -> int:
    return int((moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp())


def conflict(message: str, *, param: str) -> APIError:
    return APIError(409, message, param=param, code="conflict")


# --- the plan: provider, base and hyperparameters ----------------------------------------------


@dataclass
class Plan:
    provider: str  # openpipe | openai
    requested_base: str  # as sent (a base name, or the slug of an earlier model)
    base_model: str  # what the trainer loads (model-store name) or OpenAI's base
    hyper: TrainingHyperparameters
    stored: dict[str, Any]  # the Model's flat hyperparameters
    method: dict[str, Any]  # the job's OpenAI-shaped method
    parent_adapter_uri: str | None = None


def _check(model: type[BaseModel], value: dict[str, Any] | None, where: str) -> Any:
    try:
        return model.model_validate(value or {})
    except ValidationError as exc:
        errors = [{**e, "loc": (where, *_field_path(e["loc"]))} for e in exc.errors()]
        raise invalid_input(errors) from None


_TYPE_TAGS = {"int", "float", "str", "bool", "none"}


def _field_path(loc: tuple) -> tuple:
    """The field names in a pydantic error location, without union-member tags (``literal['auto']``)."""
    return tuple(p for p in loc if isinstance(p, int) or (p.isidentifier() and p not in _TYPE_TAGS))


def _given(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(exclude_none=True)


def _method(hyper: TrainingHyperparameters) -> dict[str, Any]:
    def auto(value: Any) -> Any:
        return "auto" if value is None else value

    sft = {
        "batch_size": hyper.batch_size,
        "learning_rate_multiplier": hyper.learning_rate_multiplier,
        "n_epochs": auto(hyper.num_epochs),
    }
    dpo = {
        "batch_size": hyper.batch_size,
        "learning_rate_multiplier": hyper.preference_learning_rate_multiplier,
        "n_epochs": auto(hyper.preference_num_epochs),
        "beta": hyper.training_beta,
    }
    if hyper.enable_preference_tuning and not hyper.enable_sft:
        return {"type": "dpo", "dpo": {"hyperparameters": dpo}}
    method: dict[str, Any] = {"type": "supervised", "supervised": {"hyperparameters": sft}}
    if hyper.enable_preference_tuning:
        method["dpo"] = {"hyperparameters": dpo}  # SFT, then DPO from the SFT adapter
    return method


def _stored(hyper: TrainingHyperparameters, given: dict[str, Any]) -> dict[str, Any]:
    """The flat form shown on the Model: what was asked, ``batch_size`` defaulting to "auto"."""
    stored: dict[str, Any] = {
        "is_sft_enabled": hyper.enable_sft,
        "batch_size": hyper.batch_size,
        **{k: v for k, v in given.items() if k not in ("is_sft_enabled", "batch_size")},
        "is_preference_tuning_enabled": hyper.enable_preference_tuning,
    }
    if hyper.enable_preference_tuning:
        stored.setdefault("preference_tuning_variant", "DPO")
    return stored


def _openpipe_hyper(config: TrainingConfig) -> tuple[TrainingHyperparameters, dict[str, Any]]:
    flat = _given(_check(FlatHyperparameters, config.hyperparameters, "trainingConfig.hyperparameters"))
    sft = _given(_check(SftHyperparameters, config.sft_hyperparameters, "trainingConfig.sft_hyperparameters"))
    pref = _given(
        _check(
            PreferenceHyperparameters,
            config.preference_hyperparameters,
            "trainingConfig.preference_hyperparameters",
        )
    )
    enable_sft = config.enable_sft if config.enable_sft is not None else flat.get("is_sft_enabled", True)
    enable_pref = (
        config.enable_preference_tuning
        if config.enable_preference_tuning is not None
        else flat.get("is_preference_tuning_enabled", False)
    )
    if pref and not enable_pref:
        raise bad_request(
            "trainingConfig.preference_hyperparameters is set but preference tuning is not enabled: "
            "set trainingConfig.enable_preference_tuning to true.",
            param="trainingConfig.preference_hyperparameters",
        )
    if sft and not enable_sft:
        raise bad_request(
            "trainingConfig.sft_hyperparameters is set but SFT is disabled: set trainingConfig.enable_sft "
            "to true.",
            param="trainingConfig.sft_hyperparameters",
        )
    merged = {
        "is_sft_enabled": enable_sft,
        "batch_size": sft.get("batch_size", flat.get("batch_size", "auto")),
        "learning_rate_multiplier": sft.get("learning_rate_multiplier", flat.get("learning_rate_multiplier")),
        "num_epochs": sft.get("num_epochs", flat.get("num_epochs")),
        "is_preference_tuning_enabled": enable_pref,
        "preference_tuning_variant": pref.get("variant", flat.get("preference_tuning_variant")),
        "preference_tuning_learning_rate_multiplier": pref.get(
            "learning_rate_multiplier", flat.get("preference_tuning_learning_rate_multiplier")
        ),
        "preference_tuning_num_epochs": pref.get("num_epochs", flat.get("preference_tuning_num_epochs")),
        "preference_tuning_training_beta": pref.get(
            "training_beta", flat.get("preference_tuning_training_beta")
        ),
        "preference_tuning_adapter_weight": pref.get(
            "adapter_weight", flat.get("preference_tuning_adapter_weight")
        ),
    }
    if merged["preference_tuning_variant"] == "APO Zero":
        raise bad_request(
            "Preference tuning variant 'APO Zero' is not supported here; use 'DPO'.",
            param="trainingConfig.preference_hyperparameters.variant",
        )
    given = {k: v for k, v in merged.items() if v is not None}
    if not enable_pref:
        given = {k: v for k, v in given.items() if not k.startswith("preference_tuning_")}
    return _hyper(merged), given


def _hyper(flat: dict[str, Any]) -> TrainingHyperparameters:
    def value(key: str, default: Any) -> Any:
        return default if flat.get(key) is None else flat[key]

    return TrainingHyperparameters(
        enable_sft=bool(flat["is_sft_enabled"]),
        enable_preference_tuning=bool(flat["is_preference_tuning_enabled"]),
        batch_size=value("batch_size", "auto"),
        learning_rate_multiplier=value("learning_rate_multiplier", 1.0),
        num_epochs=flat.get("num_epochs"),
        preference_learning_rate_multiplier=value("preference_tuning_learning_rate_multiplier", 1.0),
        preference_num_epochs=flat.get("preference_tuning_num_epochs"),
        training_beta=value("preference_tuning_training_beta", 0.1),
        adapter_weight=value("preference_tuning_adapter_weight", 1.0),
    )


def _openai_hyper(config: TrainingConfig) -> tuple[TrainingHyperparameters, dict[str, Any]]:
    flat = _given(_check(OpenAIFlatHyperparameters, config.hyperparameters, "trainingConfig.hyperparameters"))
    sft = _given(
        _check(OpenAISftHyperparameters, config.sft_hyperparameters, "trainingConfig.sft_hyperparameters")
    )
    pref = _given(
        _check(
            OpenAIPreferenceHyperparameters,
            config.preference_hyperparameters,
            "trainingConfig.preference_hyperparameters",
        )
    )
    translated = {
        "is_sft_enabled": flat.get("is_sft_enabled"),
        "batch_size": flat.get("batch_size"),
        "learning_rate_multiplier": flat.get("learning_rate_multiplier"),
        "num_epochs": flat.get("n_epochs"),
        "is_preference_tuning_enabled": flat.get("is_preference_tuning_enabled"),
        "preference_tuning_learning_rate_multiplier": flat.get("preference_tuning_learning_rate_multiplier"),
        "preference_tuning_num_epochs": flat.get("preference_tuning_n_epochs"),
        "preference_tuning_training_beta": flat.get("preference_tuning_beta"),
    }
    envelope = TrainingConfig(
        provider="openpipe",
        baseModel=config.base_model,
        enable_sft=config.enable_sft,
        enable_preference_tuning=config.enable_preference_tuning,
        sft_hyperparameters={
            "batch_size": sft.get("batch_size"),
            "learning_rate_multiplier": sft.get("learning_rate_multiplier"),
            "num_epochs": sft.get("n_epochs"),
        },
        preference_hyperparameters={
            "learning_rate_multiplier": pref.get("learning_rate_multiplier"),
            "num_epochs": pref.get("n_epochs"),
            "training_beta": pref.get("beta"),
        },
        hyperparameters=translated,
    )
    if not any(v is not None for v in envelope.preference_hyperparameters.values()):
        envelope.preference_hyperparameters = None
    if not any(v is not None for v in envelope.sft_hyperparameters.values()):
        envelope.sft_hyperparameters = None
    return _openpipe_hyper(envelope)


async def resolve_base(
    *, session: AsyncSession, project_id: str, name: str, param: str, blobs: BlobStore | None = None
) -> tuple[str, str | None]:
    """(model-store name, parent adapter key): a base name, or the slug of a trained model to continue."""
    parent = await find_model(session=session, project_id=project_id, slug=name)
    if parent is not None:
        if parent.provider != "openpipe":
            raise bad_request(
                f"Model {name!r} was trained through OpenAI and cannot be a base here.", param=param
            )
        if not parent.adapter_uri:  # set once training succeeded (DEPLOYED, or still being deployed)
            raise bad_request(
                f"Model {name!r} is {parent.status}: only a trained model can be a base.",
                param=param,
            )
        job = await session.get(TrainingJob, parent.job_id) if parent.job_id else None
        return (job.base_model if job else parent.base_model), parent.adapter_uri
    if name in catalog.OPENPIPE_BASES or (blobs is not None and await _in_model_store(blobs, name)):
        return name, None
    raise bad_request(
        f"Unknown base model {name!r}. Use one of {', '.join(catalog.OPENPIPE_BASES)}, a model in the "
        "model store, or the slug of a model trained earlier.",
        param=param,
    )


async def _in_model_store(blobs: BlobStore, name: str) -> bool:
    """Whether ops uploaded weights for ``name`` under ``models/<name>/`` (see ``model_store``)."""
    try:
        return bool(await blobs.list(model_blob_prefix(name)))
    except (ValueError, BlobStoreError):
        return False


async def plan_for_config(
    *, session: AsyncSession, project_id: str, config: TrainingConfig, blobs: BlobStore | None = None
) -> Plan:
    if config.provider in catalog.UNSUPPORTED_PROVIDERS:
        raise bad_request(
            f"trainingConfig.provider {config.provider!r} is not supported by this deployment; "
            "use 'openpipe' (our trainer) or 'openai' (OpenAI's fine-tuning API).",
            param="trainingConfig.provider",
            code="unsupported_provider",
        )
    if config.provider == "openai":
        if config.base_model not in catalog.OPENAI_BASES:
            raise bad_request(
                f"trainingConfig.baseModel {config.base_model!r} is not an OpenAI fine-tunable model; "
                f"use one of {', '.join(catalog.OPENAI_BASES)}.",
                param="trainingConfig.baseModel",
            )
        hyper, given = _openai_hyper(config)
        return _plan("openai", config.base_model, config.base_model, None, hyper, given)
    if config.provider != "openpipe":
        raise bad_request(
            f"trainingConfig.provider must be 'openpipe' or 'openai', not {config.provider!r}.",
            param="trainingConfig.provider",
        )
    hyper, given = _openpipe_hyper(config)
    base, parent = await resolve_base(
        session=session,
        project_id=project_id,
        name=config.base_model,
        param="trainingConfig.baseModel",
        blobs=blobs,
    )
    return _plan("openpipe", config.base_model, base, parent, hyper, given)


def _plan(
    provider: str, requested: str, base: str, parent: str | None, hyper: TrainingHyperparameters, given: dict
) -> Plan:
    if not hyper.enable_sft and not hyper.enable_preference_tuning:
        raise bad_request(
            "Nothing to train: enable SFT (trainingConfig.enable_sft) and/or preference tuning "
            "(trainingConfig.enable_preference_tuning).",
            param="trainingConfig.enable_sft",
        )
    return Plan(provider, requested, base, hyper, _stored(hyper, given), _method(hyper), parent)


async def plan_for_job(
    *, session: AsyncSession, project_id: str, body: JobCreate, blobs: BlobStore | None = None
) -> Plan:
    """The OpenAI jobs API's ``model`` + ``method`` (or deprecated ``hyperparameters``) as a plan."""
    method = body.method
    if method is not None and method.type == "reinforcement":
        raise bad_request(
            "method.type 'reinforcement' is not supported; use 'supervised' or 'dpo'.", param="method.type"
        )
    dpo = method is not None and method.type == "dpo"
    chosen = body.hyperparameters
    if (
        method is not None
        and method.type == "supervised"
        and method.supervised
        and method.supervised.hyperparameters
    ):
        chosen = method.supervised.hyperparameters
    dpo_hyper = method.dpo.hyperparameters if dpo and method.dpo else None
    source = dpo_hyper or chosen

    def number(value: Any) -> Any:
        return None if value in (None, "auto") else value

    flat: dict[str, Any] = {
        "is_sft_enabled": not dpo,
        "is_preference_tuning_enabled": dpo,
        "batch_size": (source.batch_size if source and source.batch_size is not None else "auto"),
    }
    if not dpo and source is not None:
        flat["learning_rate_multiplier"] = number(source.learning_rate_multiplier)
        flat["num_epochs"] = number(source.n_epochs)
    if dpo and source is not None:
        flat["preference_tuning_learning_rate_multiplier"] = number(source.learning_rate_multiplier)
        flat["preference_tuning_num_epochs"] = number(source.n_epochs)
        flat["preference_tuning_training_beta"] = number(getattr(source, "beta", None))
    given = {k: v for k, v in flat.items() if v is not None}
    hyper = _hyper({**{k: None for k in FlatHyperparameters.model_fields}, **flat})
    hyper.seed = body.seed
    if body.model in catalog.OPENAI_BASES:
        return _plan("openai", body.model, body.model, None, hyper, given)
    base, parent = await resolve_base(
        session=session, project_id=project_id, name=body.model, param="model", blobs=blobs
    )
    return _plan("openpipe", body.model, base, parent, hyper, given)


# --- models ------------------------------------------------------------------------------------


async def find_model(*, session: AsyncSession, project_id: str, slug: str) -> FineTunedModel | None:
    return await session.scalar(
        select(FineTunedModel).where(FineTunedModel.project_id == project_id, FineTunedModel.slug == slug)
    )


async def get_model(*, session: AsyncSession, project_id: str, slug: str) -> FineTunedModel:
    model = await find_model(session=session, project_id=project_id, slug=slug)
    if model is None:
        raise not_found(f"No model with slug {slug!r} in this project.", param="model")
    return model


async def list_models(*, session: AsyncSession, project_id: str) -> list[FineTunedModel]:
    return list(
        await session.scalars(
            select(FineTunedModel)
            .where(FineTunedModel.project_id == project_id)
            .order_by(FineTunedModel.created_at.desc(), FineTunedModel.id)
        )
    )


async def pruning_rules_for(*, session: AsyncSession, project_id: str, rule_ids: list[str]) -> list[str]:
    """The texts of the chosen rules, in the order given; any id not in the project is a 400."""
    if not rule_ids:
        return []
    rows = await session.execute(
        select(PruningRule.id, PruningRule.text)
        .join(Dataset, Dataset.id == PruningRule.dataset_id)
        .where(PruningRule.id.in_(rule_ids), Dataset.project_id == project_id)
    )
    texts = dict(rows.all())
    missing = [rule_id for rule_id in rule_ids if rule_id not in texts]
    if missing:
        raise bad_request(f"No pruning rule with id {missing[0]!r} in this project.", param="pruningRuleIds")
    return [texts[rule_id] for rule_id in dict.fromkeys(rule_ids)]


async def preference_rows(*, session: AsyncSession, dataset_id: str) -> int:
    column = DatasetEntry.rejected_message
    return int(
        await session.scalar(
            select(func.count()).where(
                DatasetEntry.dataset_id == dataset_id,
                DatasetEntry.split == "TRAIN",
                and_(column.is_not(None), cast(column, Text) != "null"),
            )
        )
        or 0
    )


def model_out(model: FineTunedModel, job: TrainingJob | None) -> dict[str, Any]:
    info = catalog.base_info(job.base_model if job is not None else model.base_model)
    return {
        "id": model.slug,
        "name": model.slug,
        "object": "model",
        "description": model.description,
        "created": iso(model.created_at),
        "updated": iso(model.updated_at),
        "openpipe": {
            "baseModel": model.base_model,
            "hyperparameters": model.hyperparameters,
            "status": model.status,
            "datasetId": model.dataset_id,
            "errorMessage": model.error_message,
            "jobId": model.job_id,
            "provider": model.provider,
            "pruningRuleIds": list(model.pruning_rule_ids or []),
            "defaultTemperature": model.default_temperature,
            "trainedTokens": model.trained_tokens,
            "trainingCostUsd": model.cost_usd,
        },
        "contextWindow": info.context_window,
        "maxCompletionTokens": info.max_completion_tokens,
        "capabilities": ["chat", "tools", "json"],
        "pricing": {"chatIn": info.input_price_per_million, "chatOut": info.output_price_per_million},
        "owned_by": model.project_id,
    }


def model_record(model: FineTunedModel, job: TrainingJob | None) -> CatalogRecord:
    base = job.base_model if job is not None else model.base_model
    info = catalog.base_info(base)
    return CatalogRecord(
        kind=MODEL_KIND,
        id=f"{model.project_id}/{model.slug}",
        data={
            "project_id": model.project_id,
            "slug": model.slug,
            "model_id": model.id,
            "job_id": model.job_id,
            "status": model.status,
            "provider": model.provider,
            "base_model": base,
            "requested_base_model": model.base_model,
            "adapter_uri": model.adapter_uri,
            "upstream_model": model.upstream_model,
            "pruning_rules": list(model.pruning_rules or []),
            "default_temperature": model.default_temperature,
            "input_price_per_million": info.input_price_per_million,
            "output_price_per_million": info.output_price_per_million,
            "context_window": info.context_window,
            "max_completion_tokens": info.max_completion_tokens,
        },
    )


def deleted_record(model: FineTunedModel) -> CatalogRecord:
    return CatalogRecord(
        kind=MODEL_KIND,
        id=f"{model.project_id}/{model.slug}",
        deleted=True,
        data={"project_id": model.project_id, "slug": model.slug},
    )


async def catalog_records(*, session: AsyncSession) -> list[CatalogRecord]:
    """Every model's record, for republication at start-up."""
    models = list(await session.scalars(select(FineTunedModel).order_by(FineTunedModel.id)))
    jobs = await jobs_of(session=session, models=models)
    return [model_record(m, jobs.get(m.job_id or "")) for m in models]


async def publish_records(*, broker: KafkaBroker, records: list[CatalogRecord], timeout: float) -> None:
    for record in records:
        try:
            async with asyncio.timeout(timeout):
                await broker.publish(record.model_dump(mode="json"), CATALOG_TOPIC, key=record.key.encode())
        except Exception as exc:
            log.warning("publishing catalog record %s failed: %s", record.key, type(exc).__name__)
            raise unavailable(
                "The change was not saved: the event broker is unavailable. Retry later."
            ) from exc


def apply_locally(local: CatalogReader | None, records: list[CatalogRecord]) -> None:
    """Hand committed records to this process's catalog view (``CatalogReader.apply``), so the router
    and serving here see a model's change before ``catalog.v1`` brings it back."""
    if local is not None:
        for record in records:
            local.apply(record)


# --- starting a run ----------------------------------------------------------------------------


@dataclass
class Start:
    """Everything one training run is created from (both APIs)."""

    project_id: str
    slug: str
    dataset_id: str  # the Model's datasetId: a dataset id, or the training file's id
    plan: Plan
    training_file: str
    snapshot_key: str
    validation_file: str | None = None
    validation_key: str | None = None
    pruning_rule_ids: list[str] = field(default_factory=list)
    pruning_rules: list[str] = field(default_factory=list)
    default_temperature: float | None = None
    suffix: str | None = None
    seed: int | None = None
    metadata: dict[str, str] | None = None
    failure: dict[str, Any] | None = None  # a validation error: the job is created failed


def new_job_id() -> str:
    return f"ftjob-{secrets.token_hex(12)}"


def generated_slug(base: str, suffix: str | None) -> str:
    stem = re.sub(r"[^a-z0-9]+", "-", base.rsplit("/", 1)[-1].lower()).strip("-")[:40] or "model"
    parts = ["ft", stem, *([suffix.lower()] if suffix else []), secrets.token_hex(3)]
    return "-".join(parts)[:120]


def output_prefix(project_id: str, slug: str, job_id: str) -> str:
    return f"fine_tunes/{project_id}/{slug}/{job_id}/"


def add_event(
    session: AsyncSession,
    job: TrainingJob,
    message: str,
    *,
    level: str = "info",
    type: str = "message",
    data: dict[str, Any] | None = None,
    created_at: int | None = None,
    event_id: str | None = None,
) -> None:
    session.add(
        JobEvent(
            id=event_id or f"ftevent-{secrets.token_hex(12)}",
            job_id=job.id,
            created_at=created_at or int(time.time()),
            level=level,
            type=type,
            message=message,
            data=data,
        )
    )


async def start_training(
    *, session: AsyncSession, broker: KafkaBroker | None, start: Start
) -> tuple[FineTunedModel, TrainingJob]:
    """Write the Model and its job; publish the TrainingRequest (provider openpipe) before commit.

    ``broker`` None: the caller runs the job itself (provider openai)."""
    plan, moment = start.plan, now()
    job_id = new_job_id()
    hyper = plan.hyper.model_copy(update={"seed": start.seed if start.seed is not None else plan.hyper.seed})
    seed = hyper.seed if hyper.seed is not None else secrets.randbelow(2**31)
    hyper.seed = seed
    failed = start.failure is not None
    model = FineTunedModel(
        id=new_id("ftm"),
        project_id=start.project_id,
        slug=start.slug,
        description=None,
        dataset_id=start.dataset_id,
        job_id=job_id,
        provider=plan.provider,
        base_model=plan.requested_base,
        hyperparameters=plan.stored,
        pruning_rule_ids=start.pruning_rule_ids,
        pruning_rules=start.pruning_rules,
        default_temperature=start.default_temperature,
        status="ERROR" if failed else "PENDING",
        error_message=start.failure["message"] if failed else None,
        created_at=moment,
        updated_at=moment,
    )
    job = TrainingJob(
        id=job_id,
        project_id=start.project_id,
        model_slug=start.slug,
        provider=plan.provider,
        base_model=plan.base_model,
        parent_adapter_uri=plan.parent_adapter_uri,
        training_file=start.training_file,
        validation_file=start.validation_file,
        method=plan.method,
        hyperparameters=hyper.model_dump(mode="json"),
        pruning_rules=start.pruning_rules,
        suffix=start.suffix,
        seed=seed,
        job_metadata=start.metadata,
        status="failed" if failed else "validating_files",
        error=start.failure,
        snapshot_uri=start.snapshot_key,
        validation_snapshot_uri=start.validation_key,
        output_prefix=output_prefix(start.project_id, start.slug, job_id),
        progress={},
        result_files=[],
        last_seq=-1,
        action_seq=0,
        finished_at=unix(moment) if failed else None,
        created_at=moment,
        updated_at=moment,
    )
    session.add_all([model, job])
    try:
        async with session.begin_nested():
            await session.flush()
    except IntegrityError:
        raise conflict(
            f"A model with slug {start.slug!r} already exists in this project.", param="slug"
        ) from None
    add_event(session, job, f"Created fine-tuning job: {job.id}")
    if failed:
        add_event(session, job, start.failure["message"], level="error")
        return model, job
    add_event(session, job, "Validated training data; the training request is queued for the trainer.")
    if broker is not None:
        await send_request(session=session, broker=broker, job=job, action="start")
    return model, job


def training_request(job: TrainingJob, action: str) -> TrainingRequest:
    return TrainingRequest(
        request_id=f"{job.id}:{job.action_seq}",
        action=action,  # type: ignore[arg-type]
        job_id=job.id,
        project_id=job.project_id,
        model_slug=job.model_slug,
        base_model=job.base_model,
        parent_adapter_uri=job.parent_adapter_uri,
        snapshot_uri=job.snapshot_uri,
        validation_snapshot_uri=job.validation_snapshot_uri,
        pruning_rules=list(job.pruning_rules or []),
        hyperparameters=TrainingHyperparameters.model_validate(job.hyperparameters),
        output_prefix=job.output_prefix,
    )


async def send_request(
    *, session: AsyncSession, broker: KafkaBroker, job: TrainingJob, action: str, timeout: float = 10.0
) -> None:
    """Publish ``action`` for ``job`` and wait for the broker's ack (inside the caller's transaction)."""
    job.action_seq += 1
    request = training_request(job, action)
    await session.flush()
    try:
        async with asyncio.timeout(timeout):
            await broker.publish(
                request.model_dump(mode="json"), TRAINING_REQUESTS_TOPIC, key=job.id.encode()
            )
    except Exception as exc:
        log.warning("publishing training request %s failed: %s", request.request_id, type(exc).__name__)
        raise unavailable(
            "The training request was not accepted: the event broker is unavailable. Retry later."
        ) from exc


# --- steering a run ----------------------------------------------------------------------------


async def lock_job(session: AsyncSession, job_id: str) -> TrainingJob | None:
    """The job, holding its write lock until the transaction ends (``db.lock_row``)."""
    return await lock_row(session, TrainingJob, job_id)


async def get_job(*, session: AsyncSession, project_id: str, job_id: str, lock: bool = False) -> TrainingJob:
    job = await lock_job(session, job_id) if lock else await session.get(TrainingJob, job_id)
    if job is None or job.project_id != project_id:
        raise not_found(f"No fine-tuning job with id {job_id!r} in this project.", param="fine_tuning_job_id")
    return job


async def model_of(session: AsyncSession, job: TrainingJob) -> FineTunedModel | None:
    model = await find_model(session=session, project_id=job.project_id, slug=job.model_slug)
    return model if model is not None and model.job_id == job.id else None


_ALLOWED = {
    "cancel": ("validating_files", "queued", "running", "paused"),
    "pause": ("validating_files", "queued", "running"),
    "resume": ("paused",),
}
_AFTER = {"cancel": "cancelled", "pause": "paused", "resume": "queued"}


async def steer(
    *, session: AsyncSession, broker: KafkaBroker | None, project_id: str, job_id: str, action: str
) -> tuple[TrainingJob, list[CatalogRecord]]:
    """cancel / pause / resume: record the new status now and tell the trainer (before commit)."""
    job = await get_job(session=session, project_id=project_id, job_id=job_id, lock=True)
    if job.status not in _ALLOWED[action]:
        raise bad_request(f"Cannot {action} a job that is {job.status}.", param="fine_tuning_job_id")
    if action != "cancel" and job.provider == "openai":
        raise bad_request(
            f"Jobs trained through OpenAI cannot be {_AFTER[action]} here.", param="fine_tuning_job_id"
        )
    job.status = _AFTER[action]
    job.updated_at = now()
    if action == "cancel":
        job.finished_at = int(time.time())
    add_event(
        session,
        job,
        {
            "cancel": "Fine-tuning job cancelled.",
            "pause": "Fine-tuning job paused.",
            "resume": "Fine-tuning job resumed.",
        }[action],
    )
    records: list[CatalogRecord] = []
    model = await model_of(session, job)
    if model is not None:
        records = set_model_status(model, job)
    if broker is not None:
        await send_request(session=session, broker=broker, job=job, action=action)
    return job, records


def set_model_status(model: FineTunedModel, job: TrainingJob) -> list[CatalogRecord]:
    """Mirror the job's status onto its Model (succeeded goes through ``mark_trained``)."""
    status = JOB_TO_MODEL_STATUS.get(job.status)
    if status is None or model.status == status:
        return []
    model.status = status
    if job.status == "failed":
        model.error_message = (job.error or {}).get("message") or "Training failed."
    elif job.status == "cancelled":
        model.error_message = "Training was cancelled."
    model.updated_at = now()
    return [model_record(model, job)]


def mark_trained(model: FineTunedModel, job: TrainingJob) -> list[CatalogRecord]:
    """A succeeded run's Model becomes servable: an OpenAI fine-tune at once (OpenAI serves it);
    ours is ``PROVISIONING`` until the Deployer (``services/api/deployments``) has loaded its
    adapter on the server of its base and a probe request got an answer, which sets DEPLOYED."""
    model.status = "PROVISIONING" if model.provider == "openpipe" else "DEPLOYED"
    model.error_message = None
    model.adapter_uri = job.adapter_uri
    model.trained_tokens = job.trained_tokens
    model.cost_usd = job.cost_usd
    model.updated_at = now()
    return [model_record(model, job)]


async def delete_model(
    *, session: AsyncSession, broker: KafkaBroker | None, project_id: str, slug: str
) -> list[CatalogRecord]:
    """Delete the Model (its job stays for the record); a run still in flight is cancelled."""
    model = await get_model(session=session, project_id=project_id, slug=slug)
    job = await lock_job(session, model.job_id) if model.job_id else None
    if job is not None and job.status not in TERMINAL_JOB_STATUSES:
        job.status = "cancelled"
        job.finished_at = int(time.time())
        job.updated_at = now()
        add_event(session, job, f"Model {slug!r} was deleted; fine-tuning job cancelled.")
        if broker is not None and job.provider == "openpipe":
            await send_request(session=session, broker=broker, job=job, action="cancel")
    await session.delete(model)
    await session.flush()
    return [deleted_record(model)]


# --- training.events.v1 ------------------------------------------------------------------------


class PoisonEvent(Exception):
    """An event that can never be applied (unknown job, wrong project): it goes to the DLQ."""


def _metrics_message(data: dict[str, Any]) -> str:
    step, total = data.get("step"), data.get("total_steps")
    parts = [f"Step {step}/{total}" if total else f"Step {step}"]
    if isinstance(data.get("train_loss"), int | float):
        parts.append(f"training loss={data['train_loss']:.4f}")
    if isinstance(data.get("train_mean_token_accuracy"), int | float):
        parts.append(f"token accuracy={data['train_mean_token_accuracy']:.3f}")
    if isinstance(data.get("full_valid_loss"), int | float):
        parts.append(f"full validation loss={data['full_valid_loss']:.4f}")
    if isinstance(data.get("full_valid_mean_token_accuracy"), int | float):
        parts.append(f"full validation token accuracy={data['full_valid_mean_token_accuracy']:.3f}")
    return ": ".join([parts[0], ", ".join(parts[1:])]) if len(parts) > 1 else parts[0]


def _checkpoint_name(slug: str, phase: Any, step: int) -> str:
    """``<slug>:ckpt-step-<n>``; runs with SFT then DPO name the phase (their steps restart)."""
    return (
        f"{slug}:ckpt-{phase}-step-{step}" if isinstance(phase, str) and phase else f"{slug}:ckpt-step-{step}"
    )


def _estimated_finish(data: dict[str, Any], at: int) -> int | None:
    step, total, rate = data.get("step"), data.get("total_steps"), data.get("seconds_per_step")
    eta = data.get("eta_seconds")
    if isinstance(eta, int | float):
        return at + int(eta)
    if isinstance(step, int) and isinstance(total, int) and isinstance(rate, int | float) and total >= step:
        return at + int((total - step) * rate)
    return None


async def apply_event(*, session: AsyncSession, event: TrainingEvent) -> list[CatalogRecord] | None:
    """Apply one event; None when it was already applied (seq not newer than the job's last)."""
    job = await lock_job(session, event.job_id)
    if job is None:
        raise PoisonEvent(f"no training job {event.job_id!r}")
    if job.project_id != event.project_id:
        raise PoisonEvent(f"job {event.job_id!r} belongs to another project than {event.project_id!r}")
    if event.seq <= job.last_seq:
        return None
    job.last_seq = event.seq
    job.updated_at = now()
    if event.trained_tokens is not None:
        job.trained_tokens = event.trained_tokens
        job.cost_usd = catalog.training_cost(job.base_model, event.trained_tokens)
    if event.type == "metrics":
        job.progress = {**event.data, "updated_at": event.created_at}
        job.estimated_finish = _estimated_finish(event.data, event.created_at)
        add_event(
            session,
            job,
            event.message or _metrics_message(event.data),
            type="metrics",
            data=event.data,
            level=event.level,
            created_at=event.created_at,
        )
        return []
    if event.type == "checkpoint":
        step = int(event.data.get("step", 0))
        metrics = {k: v for k, v in event.data.items() if k != "step" and isinstance(v, int | float)}
        metrics["step"] = step
        session.add(
            JobCheckpoint(
                id=f"ftckpt-{secrets.token_hex(12)}",
                job_id=job.id,
                step=step,
                metrics=metrics,
                uri=event.artifact_uri or "",
                fine_tuned_model_checkpoint=_checkpoint_name(job.model_slug, event.data.get("phase"), step),
                created_at=event.created_at,
            )
        )
        add_event(
            session,
            job,
            event.message or f"Checkpoint saved at step {step}.",
            level=event.level,
            created_at=event.created_at,
        )
        return []
    if event.message:
        add_event(session, job, event.message, level=event.level, created_at=event.created_at)
    if event.type == "status" and event.status is not None:
        return await _apply_status(session, job, event)
    return []


async def _apply_status(session: AsyncSession, job: TrainingJob, event: TrainingEvent) -> list[CatalogRecord]:
    status = event.status
    if job.status in TERMINAL_JOB_STATUSES:
        return []  # the api already decided (cancelled, deleted model); late news changes nothing
    if job.status == "paused" and status in ("queued", "running"):
        return []  # sent before the trainer saw the pause
    job.status = status
    if "loss_curve_uri" in event.data:
        job.progress = {**(job.progress or {}), "loss_curve_uri": event.data["loss_curve_uri"]}
    if status in TERMINAL_JOB_STATUSES:
        job.finished_at = event.created_at
        job.estimated_finish = None
    if status == "failed":
        job.error = {
            "code": event.error_code or "training_failed",
            "message": event.message or "Training failed.",
            "param": None,
        }
    if status == "succeeded":
        job.fine_tuned_model = job.model_slug
        job.adapter_uri = event.artifact_uri
        if event.data.get("upstream_model"):
            job.progress = {**(job.progress or {}), "upstream_model": event.data["upstream_model"]}
    model = await model_of(session, job)
    if model is None:
        return []
    if status == "succeeded":
        model.upstream_model = event.data.get("upstream_model") or model.upstream_model
        return mark_trained(model, job)
    return set_model_status(model, job)


# --- jobs API reads ----------------------------------------------------------------------------


def job_out(job: TrainingJob) -> dict[str, Any]:
    hyper = job.hyperparameters or {}
    dpo_only = hyper.get("enable_preference_tuning") and not hyper.get("enable_sft", True)
    epochs = hyper.get("preference_num_epochs") if dpo_only else hyper.get("num_epochs")
    lr = (
        hyper.get("preference_learning_rate_multiplier")
        if dpo_only
        else hyper.get("learning_rate_multiplier")
    )
    progress = dict(job.progress or {})
    if job.status in ("running", "paused", "succeeded") and isinstance(progress.get("num_epochs"), int):
        epochs = progress["num_epochs"]
    return {
        "id": job.id,
        "object": "fine_tuning.job",
        "created_at": unix(job.created_at),
        "error": job.error,
        "fine_tuned_model": job.fine_tuned_model,
        "finished_at": job.finished_at,
        "hyperparameters": {
            "batch_size": progress.get("batch_size", hyper.get("batch_size", "auto")),
            "learning_rate_multiplier": lr if lr is not None else "auto",
            "n_epochs": epochs if epochs is not None else "auto",
        },
        "model": job.base_model,
        "organization_id": job.project_id,
        "result_files": list(job.result_files or []),
        "seed": job.seed,
        "status": job.status,
        "trained_tokens": job.trained_tokens if job.status == "succeeded" else None,
        "training_file": job.training_file,
        "validation_file": job.validation_file,
        "estimated_finish": job.estimated_finish if job.status == "running" else None,
        "integrations": None,
        "metadata": job.job_metadata,
        "method": job.method,
        "user_provided_suffix": job.suffix,
        "model_slug": job.model_slug,
        "cost_usd": job.cost_usd,
        "progress": progress,
        "loss_curve": progress.get("loss_curve_uri"),
    }


async def list_jobs(
    *, session: AsyncSession, project_id: str, after: str | None, limit: int, metadata: dict[str, str]
) -> tuple[list[TrainingJob], bool]:
    """Newest first; ``after`` = the last id of the previous page."""
    query = select(TrainingJob).where(TrainingJob.project_id == project_id)
    if after:
        anchor = await session.get(TrainingJob, after)
        if anchor is None or anchor.project_id != project_id:
            raise bad_request(f"No fine-tuning job with id {after!r} to page after.", param="after")
        query = query.where(
            (TrainingJob.created_at < anchor.created_at)
            | ((TrainingJob.created_at == anchor.created_at) & (TrainingJob.id < anchor.id))
        )
    query = query.order_by(TrainingJob.created_at.desc(), TrainingJob.id.desc())
    if not metadata:
        rows = list(await session.scalars(query.limit(limit + 1)))
        return rows[:limit], len(rows) > limit
    # metadata is JSON; filter in Python over the (project-scoped) pages
    chosen: list[TrainingJob] = []
    for job in await session.scalars(query):
        if all((job.job_metadata or {}).get(k) == v for k, v in metadata.items()):
            chosen.append(job)
            if len(chosen) > limit:
                break
    return chosen[:limit], len(chosen) > limit


async def list_events(
    *, session: AsyncSession, job: TrainingJob, after: str | None, limit: int
) -> tuple[list[JobEvent], bool]:
    """Newest first, like OpenAI's."""
    query = select(JobEvent).where(JobEvent.job_id == job.id)
    if after:
        anchor = await session.scalar(select(JobEvent).where(JobEvent.id == after, JobEvent.job_id == job.id))
        if anchor is None:
            raise bad_request(f"No event with id {after!r} on this job.", param="after")
        query = query.where(JobEvent.pk < anchor.pk)
    rows = list(await session.scalars(query.order_by(JobEvent.pk.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def event_out(event: JobEvent) -> dict[str, Any]:
    return {
        "id": event.id,
        "object": "fine_tuning.job.event",
        "created_at": event.created_at,
        "level": event.level,
        "message": event.message,
        "type": event.type,
        "data": event.data,
    }


async def list_checkpoints(
    *, session: AsyncSession, job: TrainingJob, after: str | None, limit: int
) -> tuple[list[JobCheckpoint], bool]:
    """Newest (highest step) first."""
    query = select(JobCheckpoint).where(JobCheckpoint.job_id == job.id)
    if after:
        anchor = await session.get(JobCheckpoint, after)
        if anchor is None or anchor.job_id != job.id:
            raise bad_request(f"No checkpoint with id {after!r} on this job.", param="after")
        query = query.where(
            (JobCheckpoint.step < anchor.step)
            | ((JobCheckpoint.step == anchor.step) & (JobCheckpoint.id < anchor.id))
        )
    query = query.order_by(JobCheckpoint.step.desc(), JobCheckpoint.id.desc())
    rows = list(await session.scalars(query.limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def checkpoint_out(checkpoint: JobCheckpoint) -> dict[str, Any]:
    return {
        "id": checkpoint.id,
        "object": "fine_tuning.job.checkpoint",
        "created_at": checkpoint.created_at,
        "fine_tuned_model_checkpoint": checkpoint.fine_tuned_model_checkpoint,
        "fine_tuning_job_id": checkpoint.job_id,
        "metrics": checkpoint.metrics,
        "step_number": checkpoint.step,
        "uri": checkpoint.uri or None,
    }


async def jobs_of(*, session: AsyncSession, models: list[FineTunedModel]) -> dict[str, TrainingJob]:
    job_ids = [m.job_id for m in models if m.job_id]
    if not job_ids:
        return {}
    return {j.id: j for j in await session.scalars(select(TrainingJob).where(TrainingJob.id.in_(job_ids)))}


# --- what a run trains on: a dataset snapshot or an uploaded file ------------------------------


async def dataset_snapshot_key(
    *,
    session: AsyncSession,
    blobs: BlobStore,
    project_id: str,
    dataset_id: str,
    rules: list[str] | None,
    plan: Plan,
    workdir: Path | None,
    param: str,
) -> str:
    """Freeze the dataset (``rules`` applied; None = the dataset's own rules) and return the blob key.

    Empty datasets, datasets without TRAIN rows and DPO without preference pairs are 400s naming ``param``.
    """
    dataset = await get_dataset(session=session, project_id=project_id, dataset_id=dataset_id)
    stats = (await dataset_stats(session=session, dataset_ids=[dataset.id]))[dataset.id]
    if stats.entries == 0:
        raise bad_request(f"Dataset {dataset_id!r} has no entries to train on.", param=param)
    if stats.train == 0:
        raise bad_request(
            f"Dataset {dataset_id!r} has no TRAIN entries (all are in the TEST split).", param=param
        )
    if plan.hyper.enable_preference_tuning and not await preference_rows(
        session=session, dataset_id=dataset.id
    ):
        raise bad_request(
            f"Preference tuning (DPO) needs TRAIN entries with a rejected_message; dataset {dataset_id!r} "
            "has none.",
            param="trainingConfig.enable_preference_tuning" if param == "datasetId" else "method.type",
        )
    async with snapshot_lock(dataset.id):
        snapshot = await create_snapshot(
            session=session, blobs=blobs, dataset=dataset, rules=rules, workdir=workdir
        )
    return snapshot_key(dataset.id, snapshot.content_hash)


async def training_source(
    *,
    session: AsyncSession,
    blobs: BlobStore,
    project_id: str,
    file_or_dataset: str,
    plan: Plan,
    workdir: Path | None,
    param: str,
) -> tuple[str | None, list[str], dict[str, Any] | None]:
    """For the jobs API: (snapshot key, pruning rules, failure) of a file id or a dataset id."""
    row = await files.find_file(session=session, project_id=project_id, file_id=file_or_dataset)
    if row is None:
        dataset = await session.get(Dataset, file_or_dataset)
        if dataset is None or dataset.project_id != project_id:
            raise not_found(f"No file or dataset with id {file_or_dataset!r} in this project.", param=param)
        rules = list(await pruning_rule_texts(session=session, dataset_id=dataset.id))
        key = await dataset_snapshot_key(
            session=session,
            blobs=blobs,
            project_id=project_id,
            dataset_id=dataset.id,
            rules=rules,
            plan=plan,
            workdir=workdir,
            param=param,
        )
        return key, rules, None
    if row.errors:
        return None, [], {"code": "invalid_file", "message": files.failure_message(row), "param": param}
    if plan.hyper.enable_preference_tuning and not row.preference_rows and param == "training_file":
        message = (
            f"The training file {row.id} has no preference examples (input, preferred_output, "
            "non_preferred_output) for method dpo."
        )
        return None, [], {"code": "invalid_file", "message": message, "param": param}
    return row.snapshot_uri, [], None
