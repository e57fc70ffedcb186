"""Fine-tuning tables: models (fine-tunes), their training jobs, job events, checkpoints and files.

A Model (``/models``, OpenPipe-shaped) and a TrainingJob (``/fine_tuning/jobs``, OpenAI-shaped) are
two views of one training run: every Model points at its job, and a job's ``fine_tuned_model`` is
the Model's slug. ``TrainingJob.last_seq`` is the newest ``training.events.v1`` sequence applied,
which makes applying events idempotent.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from services.common.db import Base


class FineTunedModel(Base):
    __tablename__ = "fine_tuned_models"
    __table_args__ = (UniqueConstraint("project_id", "slug", name="uq_fine_tuned_models_slug"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("projects.id", ondelete="CASCADE"), index=True
    )
    slug: Mapped[str] = mapped_column(String(120))
    description: Mapped[str | None] = mapped_column(Text, nullable=True)
    # No foreign key: a model outlives the dataset (or uploaded file) it was trained on.
    dataset_id: Mapped[str] = mapped_column(String(40), index=True)
    job_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    provider: Mapped[str] = mapped_column(String(16))  # openpipe | openai
    base_model: Mapped[str] = mapped_column(String(200))  # as requested (may be a parent model's slug)
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(JSON)  # the flat stored form
    pruning_rule_ids: Mapped[list[str]] = mapped_column(JSON, default=list)
    pruning_rules: Mapped[list[str]] = mapped_column(JSON, default=list)  # texts, frozen at creation
    default_temperature: Mapped[float | None] = mapped_column(Float, nullable=True)
    status: Mapped[str] = mapped_column(String(24))
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    adapter_uri: Mapped[str | None] = mapped_column(String(2048), nullable=True)
    upstream_model: Mapped[str | None] = mapped_column(String(200), nullable=True)  # openai: the ft: name
    trained_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    cost_usd: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class TrainingJob(Base):
    __tablename__ = "training_jobs"
    __table_args__ = (Index("ix_training_jobs_project_created", "project_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("projects.id", ondelete="CASCADE"), index=True
    )
    model_slug: Mapped[str] = mapped_column(String(120))
    provider: Mapped[str] = mapped_column(String(16))
    base_model: Mapped[str] = mapped_column(String(200))  # the resolved model-store / OpenAI name
    parent_adapter_uri: Mapped[str | None] = mapped_column(String(2048), nullable=True)
    training_file: Mapped[str] = mapped_column(String(64))  # a file id or a dataset id
    validation_file: Mapped[str | None] = mapped_column(String(64), nullable=True)
    method: Mapped[dict[str, Any]] = mapped_column(JSON)  # OpenAI shape: {type, supervised|dpo: {...}}
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(JSON)  # TrainingHyperparameters
    pruning_rules: Mapped[list[str]] = mapped_column(JSON, default=list)
    suffix: Mapped[str | None] = mapped_column(String(64), nullable=True)
    seed: Mapped[int] = mapped_column(Integer)
    job_metadata: Mapped[dict[str, str] | None] = mapped_column("metadata", JSON, nullable=True)
    status: Mapped[str] = mapped_column(String(24))
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(120), nullable=True)
    snapshot_uri: Mapped[str] = mapped_column(String(2048), default="")
    validation_snapshot_uri: Mapped[str | None] = mapped_column(String(2048), nullable=True)
    output_prefix: Mapped[str] = mapped_column(String(512), default="")
    adapter_uri: Mapped[str | None] = mapped_column(String(2048), nullable=True)
    upstream_job_id: Mapped[str | None] = mapped_column(String(120), nullable=True)
    trained_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    cost_usd: Mapped[float | None] = mapped_column(Float, nullable=True)
    # latest metrics (step, total_steps, train_loss, tokens_per_second, ...) for progress displays
    progress: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    result_files: Mapped[list[str]] = mapped_column(JSON, default=list)
    last_seq: Mapped[int] = mapped_column(BigInteger, default=-1)  # newest training event applied
    action_seq: Mapped[int] = mapped_column(Integer, default=0)  # numbers the TrainingRequests sent
    estimated_finish: Mapped[int | None] = mapped_column(Integer, nullable=True)
    finished_at: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class JobEvent(Base):
    """One line of a job's event log; ``pk`` orders them (newest first when listed)."""

    __tablename__ = "training_job_events"
    __table_args__ = (Index("ix_training_job_events_job", "job_id", "pk"),)

    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    job_id: Mapped[str] = mapped_column(String(40), ForeignKey("training_jobs.id", ondelete="CASCADE"))
    created_at: Mapped[int] = mapped_column(Integer)  # unix seconds
    level: Mapped[str] = mapped_column(String(8))
    type: Mapped[str] = mapped_column(String(16))  # message | metrics
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class JobCheckpoint(Base):
    __tablename__ = "training_job_checkpoints"
    __table_args__ = (Index("ix_training_job_checkpoints_job", "job_id", "step"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    job_id: Mapped[str] = mapped_column(String(40), ForeignKey("training_jobs.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    uri: Mapped[str] = mapped_column(String(2048))
    fine_tuned_model_checkpoint: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[int] = mapped_column(Integer)


class TrainingFile(Base):
    """``POST /files`` (purpose ``fine-tune``): the upload, its validation and its training snapshot."""

    __tablename__ = "training_files"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("projects.id", ondelete="CASCADE"), index=True
    )
    filename: Mapped[str] = mapped_column(String(512))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(Integer)
    uri: Mapped[str] = mapped_column(String(2048))  # the file as uploaded
    snapshot_uri: Mapped[str | None] = mapped_column(String(2048), nullable=True)  # rows for the trainer
    line_count: Mapped[int] = mapped_column(Integer, default=0)
    preference_rows: Mapped[int] = mapped_column(Integer, default=0)
    errors: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)  # [{line, message}], capped
    created_at: Mapped[int] = mapped_column(Integer)
