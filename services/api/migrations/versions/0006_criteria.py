"""criteria: versioned criteria and alignment sets

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def _moment(name: str) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=False)


def upgrade() -> None:
    op.create_table(
        "criteria",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column(
            "project_id", sa.String(40), sa.ForeignKey("projects.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("latest_version", sa.Integer(), nullable=False),
        _moment("created_at"),
        _moment("updated_at"),
        sa.UniqueConstraint("project_id", "name", name="uq_criteria_project_name"),
    )
    op.create_table(
        "criterion_versions",
        sa.Column(
            "criterion_id", sa.String(40), sa.ForeignKey("criteria.id", ondelete="CASCADE"), primary_key=True
        ),
        sa.Column("version", sa.Integer(), primary_key=True),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("templated_variables", sa.JSON(), nullable=False),
        _moment("created_at"),
    )
    op.create_table(
        "alignment_rows",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column(
            "criterion_id", sa.String(40), sa.ForeignKey("criteria.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("input", sa.JSON(), nullable=False),
        sa.Column("output", sa.JSON(), nullable=False),
        sa.Column("human_judgement", sa.String(8), nullable=True),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("source_entry_id", sa.String(40), nullable=True),
        _moment("created_at"),
        _moment("updated_at"),
    )
    op.create_index("ix_alignment_rows_criterion_id", "alignment_rows", ["criterion_id"])
    op.create_table(
        "alignment_judgements",
        sa.Column(
            "row_id", sa.String(40), sa.ForeignKey("alignment_rows.id", ondelete="CASCADE"), primary_key=True
        ),
        sa.Column("version", sa.Integer(), primary_key=True),
        sa.Column("status", sa.String(8), nullable=False),
        sa.Column("judgement", sa.String(8), nullable=True),
        sa.Column("explanation", sa.Text(), nullable=False),
        sa.Column("error_code", sa.String(40), nullable=True),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("cost_usd", sa.Float(), nullable=True),
        _moment("created_at"),
    )
    op.create_table(
        "alignment_jobs",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column(
            "criterion_id", sa.String(40), sa.ForeignKey("criteria.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("version", sa.Integer(), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("progress_done", sa.Integer(), nullable=False),
        sa.Column("progress_total", sa.Integer(), nullable=False),
        sa.Column("error_count", sa.Integer(), nullable=False),
        sa.Column("errors", sa.JSON(), nullable=False),
        _moment("created_at"),
        _moment("updated_at"),
    )
    op.create_index("ix_alignment_jobs_criterion_id", "alignment_jobs", ["criterion_id"])
    op.create_table(
        "criterion_judgements",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("project_id", sa.String(40), nullable=False),
        sa.Column("criterion", sa.String(100), nullable=False),
        sa.Column("criterion_version", sa.Integer(), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("source", sa.String(24), nullable=False),
        sa.Column("status", sa.String(8), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("judgement", sa.String(8), nullable=True),
        sa.Column("explanation", sa.Text(), nullable=False),
        sa.Column("error_code", sa.String(40), nullable=True),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("cost_usd", sa.Float(), nullable=True),
        sa.Column("latency_ms", sa.Integer(), nullable=False),
        _moment("created_at"),
    )
    op.create_index(
        "ix_criterion_judgements_lookup", "criterion_judgements", ["project_id", "criterion", "created_at"]
    )


def downgrade() -> None:
    op.drop_index("ix_criterion_judgements_lookup", table_name="criterion_judgements")
    op.drop_table("criterion_judgements")
    op.drop_index("ix_alignment_jobs_criterion_id", table_name="alignment_jobs")
    op.drop_table("alignment_jobs")
    op.drop_table("alignment_judgements")
    op.drop_index("ix_alignment_rows_criterion_id", table_name="alignment_rows")
    op.drop_table("alignment_rows")
    op.drop_table("criterion_versions")
    op.drop_table("criteria")
