"""Every Kafka payload, as a typed pydantic model. JSON-encoded on the wire.

Each event carries a stable id so consumers can be idempotent. Producers outside
Distillery (internal services publishing logs straight to Kafka) use the same
schema: see ``docs/log-events.md``.
"""

from __future__ import annotations

from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field

LOGS_TOPIC = "logs.v1"
CATALOG_TOPIC = "catalog.v1"

ALL_TOPICS = (
    LOGS_TOPIC,
    CATALOG_TOPIC,
    "relabel.requests.v1",
    "relabel.results.v1",
    "training.requests.v1",
    "training.events.v1",
    "eval.requests.v1",
    "eval.events.v1",
    "judgements.v1",
)


# Bounds that keep every event storable (ClickHouse Int64 times, Int32 status): 9999-12-31 in ms.
MAX_UNIX_MS = 253_402_300_799_999
MAX_STATUS_CODE = 999


def flat_event_json(event: BaseModel) -> bytes:
    """The JSON of an event whose fields are plain JSON values (no nested models, no dates):
    orjson over its fields, a fifth of pydantic's encoder on a 1.3 KB log. What orjson refuses
    (integers beyond 64 bits inside a payload) goes through pydantic's encoder."""
    try:
        return orjson.dumps(event.__dict__)
    except orjson.JSONEncodeError:
        return event.model_dump_json().encode()


def dlq_topic(topic: str) -> str:
    return f"{topic}.dlq"


class LogEvent(BaseModel):
    """One captured LLM call on ``logs.v1`` (key: project id).

    ``log_id`` is the idempotency key: the same id delivered twice is stored once.
    Derived columns (model, tokens, cost, ...) are computed by the ClickHouse writer,
    so producers only send what they observed.
    """

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = 1
    log_id: str = Field(min_length=1, max_length=64)
    project_id: str = Field(min_length=1, max_length=64)
    source: Literal["openai", "anthropic"] = "openai"
    requested_at: int = Field(ge=0, le=MAX_UNIX_MS, description="unix ms when the call was made")
    received_at: int = Field(ge=0, le=MAX_UNIX_MS, description="unix ms when the response arrived")
    req_payload: Any
    resp_payload: Any = None
    status_code: int | None = Field(None, ge=0, le=MAX_STATUS_CODE)
    error_message: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    cache_hit: bool = False
    # Set by the router when it knows the model's price (external providers, deployments).
    cost_usd: float | None = None


class CatalogRecord(BaseModel):
    """A keyed, latest-value-wins record on ``catalog.v1`` (key: ``kind/id``)."""

    kind: str
    id: str
    deleted: bool = False
    data: dict[str, Any] = Field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.kind}/{self.id}"


class DeadLetter(BaseModel):
    """A message that could not be processed, parked on ``<topic>.dlq`` with the reason."""

    topic: str
    partition: int
    offset: int
    reason: str
    key: str | None = None
    payload: str
    failed_at: int


RELABEL_REQUESTS_TOPIC = "relabel.requests.v1"
RELABEL_RESULTS_TOPIC = "relabel.results.v1"


class RelabelItem(BaseModel):
    """One entry to relabel: everything the model needs, so the worker never reads the catalog."""

    entry_id: str
    base_revision: int = Field(description="the entry revision the new output replaces")
    request: dict[str, Any] = Field(description="OpenAI chat request body: messages, tools, ...")


class RelabelRequest(BaseModel):
    """A batch of entries to relabel with one model, on ``relabel.requests.v1`` (key: job id)."""

    request_id: str = Field(description="stable: job id and batch number")
    job_id: str
    project_id: str
    dataset_id: str
    model: str
    items: list[RelabelItem]


class RelabelResult(BaseModel):
    """The new output for one entry, or why there is none, on ``relabel.results.v1`` (key: job id)."""

    result_id: str = Field(description="stable: job id and entry id")
    job_id: str
    project_id: str
    dataset_id: str
    entry_id: str
    base_revision: int
    model: str
    output: dict[str, Any] | None = None
    error: str | None = None


TRAINING_REQUESTS_TOPIC = "training.requests.v1"
TRAINING_EVENTS_TOPIC = "training.events.v1"

TrainingStatus = Literal["queued", "running", "paused", "succeeded", "failed", "cancelled"]


class TrainingHyperparameters(BaseModel):
    """Resolved hyperparameters: the api turns ``"auto"`` and defaults into numbers before sending,
    except ``batch_size`` which the trainer sizes from the data and memory when it is ``"auto"``."""

    enable_sft: bool = True
    enable_preference_tuning: bool = False
    batch_size: int | Literal["auto"] = "auto"
    learning_rate_multiplier: float = 1.0
    num_epochs: int | None = Field(None, description="None: the trainer picks from the row count")
    preference_learning_rate_multiplier: float = 1.0
    preference_num_epochs: int | None = None
    training_beta: float = 0.1
    adapter_weight: float = 1.0
    seed: int | None = None


class TrainingRequest(BaseModel):
    """One fine-tuning run, on ``training.requests.v1`` (key: job id).

    Carries everything the trainer needs so it never reads the catalog: the dataset arrives only as a
    content-addressed snapshot in the blob store. ``action`` lets the api steer a run in flight.
    """

    request_id: str = Field(description="stable: job id and action sequence number")
    action: Literal["start", "cancel", "pause", "resume"] = "start"
    job_id: str
    project_id: str
    model_slug: str = Field(description="the Model this run produces (the job's fine_tuned_model)")
    base_model: str = Field(description="a model-store name, e.g. distillery/tiny-chat")
    parent_adapter_uri: str | None = Field(
        None, description="continue from an earlier model's adapter (baseModel = that model's slug)"
    )
    snapshot_uri: str = Field("", description="blob key of the dataset snapshot (JSONL of entries)")
    validation_snapshot_uri: str | None = None
    pruning_rules: list[str] = Field(default_factory=list, description="texts removed from prompts")
    hyperparameters: TrainingHyperparameters = Field(default_factory=TrainingHyperparameters)
    output_prefix: str = Field("", description="blob prefix for adapters, checkpoints and the loss curve")


class TrainingEvent(BaseModel):
    """Status, metrics and checkpoints of a run, on ``training.events.v1`` (key: job id).

    ``event_id`` is stable (job id + sequence) so the api applies each event once.
    """

    event_id: str
    job_id: str
    project_id: str
    seq: int = Field(ge=0, description="monotonic per job; the api ignores anything not newer")
    created_at: int = Field(description="unix seconds")
    type: Literal["message", "metrics", "status", "checkpoint"]
    level: Literal["info", "warn", "error"] = "info"
    message: str = ""
    status: TrainingStatus | None = None
    # metrics: step, total_steps, train_loss, train_mean_token_accuracy, tokens_per_second, epoch
    data: dict[str, Any] = Field(default_factory=dict)
    # checkpoint: blob key of the checkpoint folder; status=succeeded: blob key of the final adapter
    artifact_uri: str | None = None
    trained_tokens: int | None = None
    error_code: str | None = None


CRITERION_KIND = "criterion"  # catalog.v1 record: id = "<project_id>/<name>", data = every version
JUDGEMENTS_TOPIC = "judgements.v1"


class JudgementEvent(BaseModel):
    """One stored verdict of a judge model, on ``judgements.v1`` (key: project id).

    Published by the judge (``POST /criteria/judge``, gRPC ``Judge``) and the router (best-of-N);
    the api stores it once per ``judgement_id``.
    """

    judgement_id: str
    project_id: str
    criterion: str = Field(description="criterion name")
    criterion_version: int
    model: str = Field(description="the judge model")
    source: str = Field("api", description="api | runtime | eval | alignment | preference | ...")
    status: Literal["success", "error"]
    score: float = 0.0
    judgement: Literal["PASS", "FAIL"] | None = None
    explanation: str = ""
    error_code: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float | None = None
    latency_ms: int = 0
    created_at: int = Field(description="unix ms")


EVAL_REQUESTS_TOPIC = "eval.requests.v1"
EVAL_EVENTS_TOPIC = "eval.events.v1"
# catalog.v1 record: id = eval id, data = {"status"}; a cancelled/deleted eval's work stops
EVAL_KIND = "eval"


class EvalEvaluator(BaseModel):
    """One evaluator of an eval: ``code`` (a sandboxed grader function), ``criterion`` (the judge),
    ``head_to_head`` (every pair of models per row) or ``grader`` (an OpenAI grader object)."""

    type: Literal["code", "criterion", "head_to_head", "grader"]
    name: str
    source: str | None = None
    criterion: str | None = None
    judge_model: str | None = None
    instructions: str | None = None
    grader: dict[str, Any] | None = None


class EvalRow(BaseModel):
    """One dataset entry to evaluate: its input, its own output ("original") and, per model, the
    key under which that model's output is stored, with the output when it already exists."""

    entry_id: str
    input: dict[str, Any] = Field(description="messages (without the answer), tools, tool_choice, ...")
    expected: dict[str, Any] = Field(description="the dataset's output message")
    metadata: dict[str, str] = Field(default_factory=dict)
    output_keys: dict[str, str] = Field(default_factory=dict, description="model -> output key")
    known_outputs: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="model -> stored output (generated once, reused)"
    )


class EvalRequest(BaseModel):
    """A batch of one eval's rows, on ``eval.requests.v1`` (key: eval id)."""

    request_id: str = Field(description="stable: eval id and batch number")
    eval_id: str
    project_id: str
    models: list[str]
    evaluators: list[EvalEvaluator]
    rows: list[EvalRow]
    generation: dict[str, Any] = Field(default_factory=dict, description="settings, e.g. temperature")


class EvalOutput(BaseModel):
    model: str
    output_key: str = ""
    output: dict[str, Any] | None = None
    error: str | None = None
    reused: bool = False
    latency_ms: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float | None = None


class EvalScore(BaseModel):
    """One evaluator's verdict on one model's output (``opponent`` set: a head-to-head pair)."""

    evaluator: str
    model: str
    opponent: str = ""
    score: float | None = None
    winner: str | None = Field(None, description="head-to-head: the winning model, or 'tie'")
    explanation: str | None = None
    error: str | None = None
    judge_calls: int = 0
    cost_usd: float | None = None


class EvalEvent(BaseModel):
    """One row's outputs and scores, or a status change, on ``eval.events.v1`` (key: eval id).

    ``event_id`` is stable (eval id + entry id for rows) so the api applies each once.
    """

    event_id: str
    eval_id: str
    project_id: str
    type: Literal["row", "status"]
    entry_id: str | None = None
    outputs: list[EvalOutput] = Field(default_factory=list)
    scores: list[EvalScore] = Field(default_factory=list)
    status: Literal["running", "failed"] | None = None
    message: str = ""
    created_at: int = Field(0, description="unix ms")
