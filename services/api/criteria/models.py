"""Criteria tables: a criterion and its immutable versions, alignment rows with the human label
and one judge verdict per (row, version), alignment jobs, and every stored judgement."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, DateTime, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from services.common.db import Base


class Criterion(Base):
    __tablename__ = "criteria"
    __table_args__ = (UniqueConstraint("project_id", "name", name="uq_criteria_project_name"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project_id: Mapped[str] = mapped_column(String(40), ForeignKey("projects.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(100))
    latest_version: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class CriterionVersion(Base):
    """Never edited: a change to the model, prompt or templated variables is a new version."""

    __tablename__ = "criterion_versions"

    criterion_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("criteria.id", ondelete="CASCADE"), primary_key=True
    )
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    model: Mapped[str] = mapped_column(String(200))
    prompt: Mapped[str] = mapped_column(Text)
    templated_variables: Mapped[list[str]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class AlignmentRow(Base):
    __tablename__ = "alignment_rows"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    criterion_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("criteria.id", ondelete="CASCADE"), index=True
    )
    input: Mapped[dict[str, Any]] = mapped_column(JSON)  # messages, tools, tool_choice
    output: Mapped[dict[str, Any]] = mapped_column(JSON)
    human_judgement: Mapped[str | None] = mapped_column(String(8), nullable=True)  # PASS | FAIL | SKIP
    source: Mapped[str] = mapped_column(String(16))  # dataset | upload
    source_entry_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class AlignmentJudgement(Base):
    """The judge's verdict on one row by one criterion version (a re-run replaces it)."""

    __tablename__ = "alignment_judgements"

    row_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("alignment_rows.id", ondelete="CASCADE"), primary_key=True
    )
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    status: Mapped[str] = mapped_column(String(8))  # success | error
    judgement: Mapped[str | None] = mapped_column(String(8), nullable=True)
    explanation: Mapped[str] = mapped_column(Text, default="")
    error_code: Mapped[str | None] = mapped_column(String(40), nullable=True)
    model: Mapped[str] = mapped_column(String(200))
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cost_usd: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class AlignmentJob(Base):
    """Long alignment work (judging the set, importing with generated outputs), polled by clients."""

    __tablename__ = "alignment_jobs"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    criterion_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("criteria.id", ondelete="CASCADE"), index=True
    )
    kind: Mapped[str] = mapped_column(String(16))  # judge | import
    version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    status: Mapped[str] = mapped_column(String(16))  # queued | running | succeeded | partial | failed
    progress_done: Mapped[int] = mapped_column(Integer, default=0)
    progress_total: Mapped[int] = mapped_column(Integer, default=0)
    error_count: Mapped[int] = mapped_column(Integer, default=0)
    errors: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Judgement(Base):
    """Every verdict a judge model gave (``judgements.v1``): criterion version, model, tokens, cost.

    Kept in the catalog database rather than ClickHouse (whose one owner is ingest) for now."""

    __tablename__ = "criterion_judgements"
    __table_args__ = (Index("ix_criterion_judgements_lookup", "project_id", "criterion", "created_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project_id: Mapped[str] = mapped_column(String(40))
    criterion: Mapped[str] = mapped_column(String(100))
    criterion_version: Mapped[int] = mapped_column(Integer)
    model: Mapped[str] = mapped_column(String(200))
    source: Mapped[str] = mapped_column(String(24))
    status: Mapped[str] = mapped_column(String(8))
    score: Mapped[float] = mapped_column(Float)
    judgement: Mapped[str | None] = mapped_column(String(8), nullable=True)
    explanation: Mapped[str] = mapped_column(Text, default="")
    error_code: Mapped[str | None] = mapped_column(String(40), nullable=True)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cost_usd: Mapped[float | None] = mapped_column(Float, nullable=True)
    latency_ms: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
