"""relabel outcomes: one row per job and entry, so results apply exactly once

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "relabel_outcomes",
        sa.Column(
            "job_id", sa.String(40), sa.ForeignKey("dataset_jobs.id", ondelete="CASCADE"), primary_key=True
        ),
        sa.Column("entry_id", sa.String(40), primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("relabel_outcomes")
