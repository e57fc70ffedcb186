"""Wire schemas of the models API (OpenPipe, camelCase mixed as documented) and the jobs API (OpenAI).

``POST /models`` takes ``trainingConfig`` per provider: ``openpipe`` (our trainer) and ``openai``
(OpenAI's own fine-tuning API) are supported; the SDK's ``openpipeReward`` and ``gemini`` get a 400.
Hyperparameter blocks are validated with the model of their provider so a wrong field is named
in the 400 (``trainingConfig.sft_hyperparameters.num_epochs: ...``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

Slug = Annotated[
    str,
    StringConstraints(
        strip_whitespace=True, min_length=1, max_length=120, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
    ),
]
BatchSize = Literal["auto"] | Annotated[int, Field(ge=1, le=4096)]
Multiplier = Annotated[float, Field(gt=0, le=100)]
Epochs = Annotated[int, Field(ge=1, le=100)]
Auto = Literal["auto"]

MODEL_STATUSES = (
    "PENDING",
    "TRAINING",
    "DEPLOYED",
    "ERROR",
    "DEPRECATED",
    "PENDING_DEPRECATION",
    "QUEUED",
    "PROVISIONING",
)
JOB_STATUSES = ("validating_files", "queued", "running", "paused", "succeeded", "failed", "cancelled")
TERMINAL_JOB_STATUSES = ("succeeded", "failed", "cancelled")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- POST /models: trainingConfig per provider -------------------------------------------------


class SftHyperparameters(_Strict):
    batch_size: BatchSize | None = None
    learning_rate_multiplier: Multiplier | None = None
    num_epochs: Epochs | None = None


class PreferenceHyperparameters(_Strict):
    variant: Literal["DPO", "APO Zero"] | None = None
    learning_rate_multiplier: Multiplier | None = None
    num_epochs: Epochs | None = None
    training_beta: Annotated[float, Field(gt=0, le=100)] | None = None
    adapter_weight: Annotated[float, Field(ge=0, le=100)] | None = None


class FlatHyperparameters(_Strict):
    """DEPRECATED flat form (and the stored form of a model's hyperparameters)."""

    is_sft_enabled: bool | None = None
    batch_size: BatchSize | None = None
    learning_rate_multiplier: Multiplier | None = None
    num_epochs: Epochs | None = None
    is_preference_tuning_enabled: bool | None = None
    preference_tuning_variant: Literal["DPO", "APO Zero"] | None = None
    preference_tuning_learning_rate_multiplier: Multiplier | None = None
    preference_tuning_num_epochs: Epochs | None = None
    preference_tuning_training_beta: Annotated[float, Field(gt=0, le=100)] | None = None
    preference_tuning_adapter_weight: Annotated[float, Field(ge=0, le=100)] | None = None


class OpenAISftHyperparameters(_Strict):
    batch_size: BatchSize | None = None
    learning_rate_multiplier: Multiplier | None = None
    n_epochs: Epochs | None = None


class OpenAIPreferenceHyperparameters(OpenAISftHyperparameters):
    beta: Annotated[float, Field(gt=0, le=100)] | None = None


class OpenAIFlatHyperparameters(_Strict):
    is_sft_enabled: bool | None = None
    batch_size: BatchSize | None = None
    learning_rate_multiplier: Multiplier | None = None
    n_epochs: Epochs | None = None
    is_preference_tuning_enabled: bool | None = None
    preference_tuning_beta: Annotated[float, Field(gt=0, le=100)] | None = None
    preference_tuning_batch_size: BatchSize | None = None
    preference_tuning_learning_rate_multiplier: Multiplier | None = None
    preference_tuning_n_epochs: Epochs | None = None


class TrainingConfig(BaseModel):
    """The envelope; the hyperparameter blocks are checked per provider in ``service.resolve_config``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    provider: str = "openpipe"
    base_model: str = Field(alias="baseModel", min_length=1, max_length=200)
    enable_sft: bool | None = None
    enable_preference_tuning: bool | None = None
    sft_hyperparameters: dict[str, Any] | None = None
    preference_hyperparameters: dict[str, Any] | None = None
    hyperparameters: dict[str, Any] | None = None


class ModelCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    dataset_id: str = Field(alias="datasetId", min_length=1, max_length=64)
    slug: Slug
    pruning_rule_ids: list[str] = Field(default_factory=list, alias="pruningRuleIds", max_length=1000)
    training_config: TrainingConfig = Field(alias="trainingConfig")
    default_temperature: Annotated[float, Field(ge=0, le=2)] | None = Field(
        default=None, alias="defaultTemperature"
    )


# --- Model out ---------------------------------------------------------------------------------


class ModelPricing(BaseModel):
    chatIn: float
    chatOut: float


class ModelOpenpipe(BaseModel):
    baseModel: str
    hyperparameters: dict[str, Any] | None
    status: str
    datasetId: str
    errorMessage: str | None
    # additive (the SDKs ignore them)
    jobId: str | None = None
    provider: str = "openpipe"
    pruningRuleIds: list[str] = Field(default_factory=list)
    defaultTemperature: float | None = None
    trainedTokens: int | None = None
    trainingCostUsd: float | None = None


class ModelOut(BaseModel):
    id: str
    name: str
    object: Literal["model"] = "model"
    description: str | None
    created: str
    updated: str
    openpipe: ModelOpenpipe
    contextWindow: int
    maxCompletionTokens: int
    capabilities: list[Literal["chat", "tools", "json"]]
    pricing: ModelPricing
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelOut]


class ModelDeleted(BaseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool = True


# --- deprecated /unstable/finetune/* -----------------------------------------------------------


class UnstableFinetuneCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    datasetId: str = Field(min_length=1, max_length=64)
    slug: Slug
    baseModel: str = Field(min_length=1, max_length=200)
    overrides: dict[str, Any] | None = None


class UnstableFinetuneId(BaseModel):
    id: str


class UnstableFinetuneOut(BaseModel):
    id: str
    status: str
    slug: str
    baseModel: str
    errorMessage: str | None
    datasetId: str
    createdAt: str


class UnstableFinetuneDelete(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str | None = None
    slug: str | None = None


class UnstableFinetuneDeleted(BaseModel):
    deleted: str


# --- /fine_tuning/jobs (OpenAI) ----------------------------------------------------------------


class JobHyperparameters(_Strict):
    batch_size: Auto | Annotated[int, Field(ge=1, le=4096)] | None = None
    learning_rate_multiplier: Auto | Multiplier | None = None
    n_epochs: Auto | Epochs | None = None


class DpoHyperparameters(JobHyperparameters):
    beta: Auto | Annotated[float, Field(gt=0, le=100)] | None = None


class SupervisedMethod(_Strict):
    hyperparameters: JobHyperparameters | None = None


class DpoMethod(_Strict):
    hyperparameters: DpoHyperparameters | None = None


class Method(_Strict):
    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None
    reinforcement: dict[str, Any] | None = None


MetadataKey = Annotated[str, StringConstraints(min_length=1, max_length=64)]
MetadataValue = Annotated[str, StringConstraints(max_length=512)]


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=200)
    training_file: str = Field(min_length=1, max_length=64)
    validation_file: str | None = Field(default=None, max_length=64)
    hyperparameters: JobHyperparameters | None = None  # deprecated: method.supervised.hyperparameters
    method: Method | None = None
    suffix: (
        Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")] | None
    ) = None
    seed: Annotated[int, Field(ge=0, le=2_147_483_647)] | None = None
    metadata: Annotated[dict[MetadataKey, MetadataValue], Field(max_length=16)] | None = None
    integrations: list[dict[str, Any]] | None = None


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class JobOut(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    error: JobError | None
    fine_tuned_model: str | None
    finished_at: int | None
    hyperparameters: dict[str, Any]
    model: str
    organization_id: str
    result_files: list[str]
    seed: int
    status: str
    trained_tokens: int | None
    training_file: str
    validation_file: str | None
    estimated_finish: int | None = None
    integrations: list[dict[str, Any]] | None = None
    metadata: dict[str, str] | None = None
    method: dict[str, Any] | None = None
    user_provided_suffix: str | None = None
    # additive
    model_slug: str | None = None
    cost_usd: float | None = None
    progress: dict[str, Any] = Field(default_factory=dict)
    loss_curve: str | None = None


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobOut]
    has_more: bool


class EventOut(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: str
    message: str
    type: str
    data: dict[str, Any] | None = None


class EventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EventOut]
    has_more: bool


class CheckpointOut(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: dict[str, Any]
    step_number: int
    uri: str | None = None  # additive: the blob key of the checkpoint


class CheckpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[CheckpointOut]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


# --- /files (OpenAI) ---------------------------------------------------------------------------


class FileOut(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"] = "processed"
    status_details: str | None = None
    expires_at: int | None = None


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileOut]
    has_more: bool = False


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True
