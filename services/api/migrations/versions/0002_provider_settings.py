"""provider keys, external providers and models, deployments

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def _project_id(primary_key: bool = False) -> sa.Column:
    return sa.Column(
        "project_id",
        sa.String(40),
        sa.ForeignKey("projects.id", ondelete="CASCADE"),
        nullable=False,
        primary_key=primary_key,
    )


def upgrade() -> None:
    op.create_table(
        "provider_keys",
        _project_id(primary_key=True),
        sa.Column("openai_key_enc", sa.Text(), nullable=True),
        sa.Column("anthropic_key_enc", sa.Text(), nullable=True),
        sa.Column("gemini_key_enc", sa.Text(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "external_providers",
        sa.Column("id", sa.String(40), primary_key=True),
        _project_id(),
        sa.Column("slug", sa.String(64), nullable=False),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("base_url", sa.String(2048), nullable=False),
        sa.Column("api_key_enc", sa.Text(), nullable=True),
        sa.Column("api_version", sa.String(64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("project_id", "slug", name="uq_external_providers_project_slug"),
    )
    op.create_table(
        "external_models",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column(
            "provider_id",
            sa.String(40),
            sa.ForeignKey("external_providers.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("slug", sa.String(200), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("context_window", sa.Integer(), nullable=True),
        sa.Column("input_price_per_million", sa.Float(), nullable=True),
        sa.Column("output_price_per_million", sa.Float(), nullable=True),
        sa.UniqueConstraint("provider_id", "slug", name="uq_external_models_provider_slug"),
    )
    op.create_index("ix_external_models_provider_id", "external_models", ["provider_id"])
    op.create_table(
        "deployments",
        sa.Column("id", sa.String(40), primary_key=True),
        _project_id(),
        sa.Column("slug", sa.String(64), nullable=False),
        sa.Column("base_url", sa.String(2048), nullable=False),
        sa.Column("upstream_model", sa.String(200), nullable=False),
        sa.Column("api_key_enc", sa.Text(), nullable=True),
        sa.Column("pruning_rules", sa.JSON(), nullable=False),
        sa.Column("default_temperature", sa.Float(), nullable=True),
        sa.Column("input_price_per_million", sa.Float(), nullable=True),
        sa.Column("output_price_per_million", sa.Float(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("project_id", "slug", name="uq_deployments_project_slug"),
    )


def downgrade() -> None:
    op.drop_table("deployments")
    op.drop_index("ix_external_models_provider_id", table_name="external_models")
    op.drop_table("external_models")
    op.drop_table("external_providers")
    op.drop_table("provider_keys")
