"""evals: eval definitions, shared model outputs, per-row outputs and results

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def _eval_id() -> sa.Column:
    return sa.Column(
        "eval_id", sa.String(40), sa.ForeignKey("evals.id", ondelete="CASCADE"), primary_key=True
    )


def upgrade() -> None:
    op.create_table(
        "evals",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column(
            "project_id", sa.String(40), sa.ForeignKey("projects.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("dataset_id", sa.String(40), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("split", sa.String(8), nullable=False),
        sa.Column("sample", sa.Integer(), nullable=True),
        sa.Column("models", sa.JSON(), nullable=False),
        sa.Column("evaluators", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("progress_done", sa.Integer(), nullable=False),
        sa.Column("progress_total", sa.Integer(), nullable=False),
        sa.Column("estimated_cost", sa.JSON(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_evals_project_id", "evals", ["project_id"])
    op.create_table(
        "eval_outputs",
        sa.Column(
            "project_id", sa.String(40), sa.ForeignKey("projects.id", ondelete="CASCADE"), primary_key=True
        ),
        sa.Column("output_key", sa.String(64), primary_key=True),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("output", sa.JSON(), nullable=False),
        sa.Column("latency_ms", sa.Integer(), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("cost_usd", sa.Float(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "eval_row_outputs",
        _eval_id(),
        sa.Column("entry_id", sa.String(40), primary_key=True),
        sa.Column("model", sa.String(200), primary_key=True),
        sa.Column("output_key", sa.String(64), nullable=False),
        sa.Column("output", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("reused", sa.Boolean(), nullable=False),
        sa.Column("latency_ms", sa.Integer(), nullable=False),
        sa.Column("cost_usd", sa.Float(), nullable=True),
    )
    op.create_table(
        "eval_results",
        _eval_id(),
        sa.Column("entry_id", sa.String(40), primary_key=True),
        sa.Column("evaluator", sa.String(200), primary_key=True),
        sa.Column("model", sa.String(200), primary_key=True),
        sa.Column("opponent", sa.String(200), primary_key=True),
        sa.Column("score", sa.Float(), nullable=True),
        sa.Column("winner", sa.String(200), nullable=True),
        sa.Column("explanation", sa.Text(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("judge_calls", sa.Integer(), nullable=False),
        sa.Column("cost_usd", sa.Float(), nullable=True),
    )
    op.create_index("ix_eval_results_eval_evaluator", "eval_results", ["eval_id", "evaluator", "model"])
    op.create_table(
        "eval_applied_events",
        sa.Column("event_id", sa.String(200), primary_key=True),
        sa.Column("eval_id", sa.String(40), sa.ForeignKey("evals.id", ondelete="CASCADE"), nullable=False),
    )
    op.create_index("ix_eval_applied_events_eval_id", "eval_applied_events", ["eval_id"])


def downgrade() -> None:
    op.drop_table("eval_applied_events")
    op.drop_table("eval_results")
    op.drop_table("eval_row_outputs")
    op.drop_table("eval_outputs")
    op.drop_table("evals")
