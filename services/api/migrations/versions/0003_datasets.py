"""datasets, entries and their revisions, pruning rules, jobs, snapshots

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def _timestamps() -> list[sa.Column]:
    return [
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    ]


def upgrade() -> None:
    op.create_table(
        "datasets",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column(
            "project_id", sa.String(40), sa.ForeignKey("projects.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("name", sa.String(200), nullable=False),
        *_timestamps(),
    )
    op.create_index("ix_datasets_project_id", "datasets", ["project_id"])
    op.create_table(
        "dataset_entries",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column(
            "dataset_id", sa.String(40), sa.ForeignKey("datasets.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("content_hash", sa.String(64), nullable=False),
        sa.Column("split", sa.String(8), nullable=False),
        sa.Column("messages", sa.JSON(), nullable=False),
        sa.Column("tools", sa.JSON(), nullable=True),
        sa.Column("tool_choice", sa.JSON(), nullable=True),
        sa.Column("response_format", sa.JSON(), nullable=True),
        sa.Column("output", sa.JSON(), nullable=False),
        sa.Column("rejected_message", sa.JSON(), nullable=True),
        sa.Column("metadata", sa.JSON(), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("source_log_id", sa.String(64), nullable=True),
        sa.Column("provenance", sa.String(24), nullable=False),
        sa.Column("relabel_model", sa.String(200), nullable=True),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("output_tokens", sa.Integer(), nullable=False),
        *_timestamps(),
        sa.UniqueConstraint("dataset_id", "source_log_id", name="uq_dataset_entries_source_log"),
    )
    op.create_index("ix_dataset_entries_dataset_split", "dataset_entries", ["dataset_id", "split"])
    op.create_index("ix_dataset_entries_dataset_hash", "dataset_entries", ["dataset_id", "content_hash"])
    op.create_table(
        "dataset_entry_revisions",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column(
            "entry_id", sa.String(40), sa.ForeignKey("dataset_entries.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("output", sa.JSON(), nullable=False),
        sa.Column("rejected_message", sa.JSON(), nullable=True),
        sa.Column("provenance", sa.String(24), nullable=False),
        sa.Column("relabel_model", sa.String(200), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_dataset_entry_revisions_entry_id", "dataset_entry_revisions", ["entry_id"])
    op.create_table(
        "pruning_rules",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column(
            "dataset_id", sa.String(40), sa.ForeignKey("datasets.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_pruning_rules_dataset_id", "pruning_rules", ["dataset_id"])
    op.create_table(
        "dataset_jobs",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column(
            "project_id", sa.String(40), sa.ForeignKey("projects.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column(
            "dataset_id", sa.String(40), sa.ForeignKey("datasets.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("progress_done", sa.Integer(), nullable=False),
        sa.Column("progress_total", sa.Integer(), nullable=True),
        sa.Column("errors", sa.JSON(), nullable=False),
        sa.Column("error_count", sa.Integer(), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("result", sa.JSON(), nullable=False),
        *_timestamps(),
    )
    op.create_index("ix_dataset_jobs_project_id", "dataset_jobs", ["project_id"])
    op.create_index("ix_dataset_jobs_dataset_id", "dataset_jobs", ["dataset_id"])
    op.create_table(
        "dataset_snapshots",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("content_hash", sa.String(64), nullable=False),
        sa.Column(
            "dataset_id", sa.String(40), sa.ForeignKey("datasets.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("uri", sa.String(2048), nullable=False),
        sa.Column("entry_count", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("dataset_id", "content_hash", name="uq_dataset_snapshots_content"),
    )
    op.create_index("ix_dataset_snapshots_dataset_id", "dataset_snapshots", ["dataset_id"])


def downgrade() -> None:
    for table in (
        "dataset_snapshots",
        "dataset_jobs",
        "pruning_rules",
        "dataset_entry_revisions",
        "dataset_entries",
        "datasets",
    ):
        op.drop_table(table)
