"""fine-tuning: models, training jobs, job events, checkpoints, files

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def _project() -> sa.Column:
    return sa.Column(
        "project_id", sa.String(40), sa.ForeignKey("projects.id", ondelete="CASCADE"), nullable=False
    )


def _job() -> sa.Column:
    return sa.Column(
        "job_id", sa.String(40), sa.ForeignKey("training_jobs.id", ondelete="CASCADE"), nullable=False
    )


def upgrade() -> None:
    op.create_table(
        "fine_tuned_models",
        sa.Column("id", sa.String(40), primary_key=True),
        _project(),
        sa.Column("slug", sa.String(120), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("dataset_id", sa.String(40), nullable=False),
        sa.Column("job_id", sa.String(40), nullable=True),
        sa.Column("provider", sa.String(16), nullable=False),
        sa.Column("base_model", sa.String(200), nullable=False),
        sa.Column("hyperparameters", sa.JSON(), nullable=False),
        sa.Column("pruning_rule_ids", sa.JSON(), nullable=False),
        sa.Column("pruning_rules", sa.JSON(), nullable=False),
        sa.Column("default_temperature", sa.Float(), nullable=True),
        sa.Column("status", sa.String(24), nullable=False),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("adapter_uri", sa.String(2048), nullable=True),
        sa.Column("upstream_model", sa.String(200), nullable=True),
        sa.Column("trained_tokens", sa.Integer(), nullable=True),
        sa.Column("cost_usd", sa.Float(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("project_id", "slug", name="uq_fine_tuned_models_slug"),
    )
    op.create_index("ix_fine_tuned_models_project_id", "fine_tuned_models", ["project_id"])
    op.create_index("ix_fine_tuned_models_dataset_id", "fine_tuned_models", ["dataset_id"])
    op.create_table(
        "training_jobs",
        sa.Column("id", sa.String(40), primary_key=True),
        _project(),
        sa.Column("model_slug", sa.String(120), nullable=False),
        sa.Column("provider", sa.String(16), nullable=False),
        sa.Column("base_model", sa.String(200), nullable=False),
        sa.Column("parent_adapter_uri", sa.String(2048), nullable=True),
        sa.Column("training_file", sa.String(64), nullable=False),
        sa.Column("validation_file", sa.String(64), nullable=True),
        sa.Column("method", sa.JSON(), nullable=False),
        sa.Column("hyperparameters", sa.JSON(), nullable=False),
        sa.Column("pruning_rules", sa.JSON(), nullable=False),
        sa.Column("suffix", sa.String(64), nullable=True),
        sa.Column("seed", sa.Integer(), nullable=False),
        sa.Column("metadata", sa.JSON(), nullable=True),
        sa.Column("status", sa.String(24), nullable=False),
        sa.Column("error", sa.JSON(), nullable=True),
        sa.Column("fine_tuned_model", sa.String(120), nullable=True),
        sa.Column("snapshot_uri", sa.String(2048), nullable=False),
        sa.Column("validation_snapshot_uri", sa.String(2048), nullable=True),
        sa.Column("output_prefix", sa.String(512), nullable=False),
        sa.Column("adapter_uri", sa.String(2048), nullable=True),
        sa.Column("upstream_job_id", sa.String(120), nullable=True),
        sa.Column("trained_tokens", sa.Integer(), nullable=True),
        sa.Column("cost_usd", sa.Float(), nullable=True),
        sa.Column("progress", sa.JSON(), nullable=False),
        sa.Column("result_files", sa.JSON(), nullable=False),
        sa.Column("last_seq", sa.BigInteger(), nullable=False),
        sa.Column("action_seq", sa.Integer(), nullable=False),
        sa.Column("estimated_finish", sa.Integer(), nullable=True),
        sa.Column("finished_at", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_training_jobs_project_id", "training_jobs", ["project_id"])
    op.create_index("ix_training_jobs_project_created", "training_jobs", ["project_id", "created_at"])
    op.create_table(
        "training_job_events",
        sa.Column("pk", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(64), nullable=False, unique=True),
        _job(),
        sa.Column("created_at", sa.Integer(), nullable=False),
        sa.Column("level", sa.String(8), nullable=False),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("data", sa.JSON(), nullable=True),
    )
    op.create_index("ix_training_job_events_job", "training_job_events", ["job_id", "pk"])
    op.create_table(
        "training_job_checkpoints",
        sa.Column("id", sa.String(64), primary_key=True),
        _job(),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("uri", sa.String(2048), nullable=False),
        sa.Column("fine_tuned_model_checkpoint", sa.String(200), nullable=False),
        sa.Column("created_at", sa.Integer(), nullable=False),
    )
    op.create_index("ix_training_job_checkpoints_job", "training_job_checkpoints", ["job_id", "step"])
    op.create_table(
        "training_files",
        sa.Column("id", sa.String(40), primary_key=True),
        _project(),
        sa.Column("filename", sa.String(512), nullable=False),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("bytes", sa.Integer(), nullable=False),
        sa.Column("uri", sa.String(2048), nullable=False),
        sa.Column("snapshot_uri", sa.String(2048), nullable=True),
        sa.Column("line_count", sa.Integer(), nullable=False),
        sa.Column("preference_rows", sa.Integer(), nullable=False),
        sa.Column("errors", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.Integer(), nullable=False),
    )
    op.create_index("ix_training_files_project_id", "training_files", ["project_id"])


def downgrade() -> None:
    op.drop_index("ix_training_files_project_id", "training_files")
    op.drop_table("training_files")
    op.drop_index("ix_training_job_checkpoints_job", "training_job_checkpoints")
    op.drop_table("training_job_checkpoints")
    op.drop_index("ix_training_job_events_job", "training_job_events")
    op.drop_table("training_job_events")
    op.drop_index("ix_training_jobs_project_created", "training_jobs")
    op.drop_index("ix_training_jobs_project_id", "training_jobs")
    op.drop_table("training_jobs")
    op.drop_index("ix_fine_tuned_models_dataset_id", "fine_tuned_models")
    op.drop_index("ix_fine_tuned_models_project_id", "fine_tuned_models")
    op.drop_table("fine_tuned_models")
