"""Evals: the catalog tables.

Results live in the catalog database, written only by the api from ``eval.events.v1`` (the
design puts them in ClickHouse through ingest; see the README's Evaluations section for why
they are here for now). An output is stored once per (project, output key) — the key hashes the
model, the input and the generation settings — and reused by every eval that needs it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from services.common.db import Base


class Eval(Base):
    __tablename__ = "evals"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("projects.id", ondelete="CASCADE"), index=True
    )
    dataset_id: Mapped[str] = mapped_column(String(40))
    name: Mapped[str] = mapped_column(String(200))
    split: Mapped[str] = mapped_column(String(8))
    sample: Mapped[int | None] = mapped_column(Integer, nullable=True)
    models: Mapped[list[str]] = mapped_column(JSON)
    evaluators: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16))
    progress_done: Mapped[int] = mapped_column(Integer, default=0)
    progress_total: Mapped[int] = mapped_column(Integer, default=0)
    estimated_cost: Mapped[dict[str, Any]] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class EvalOutputRecord(Base):
    """A model's output for one input and generation settings, shared by every eval of the project."""

    __tablename__ = "eval_outputs"

    project_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("projects.id", ondelete="CASCADE"), primary_key=True
    )
    output_key: Mapped[str] = mapped_column(String(64), primary_key=True)
    model: Mapped[str] = mapped_column(String(200))
    output: Mapped[dict[str, Any]] = mapped_column(JSON)
    latency_ms: Mapped[int] = mapped_column(Integer, default=0)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cost_usd: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class EvalRowOutput(Base):
    """Which output (or generation error) a model gave for one entry of one eval."""

    __tablename__ = "eval_row_outputs"

    eval_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("evals.id", ondelete="CASCADE"), primary_key=True
    )
    entry_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    model: Mapped[str] = mapped_column(String(200), primary_key=True)
    output_key: Mapped[str] = mapped_column(String(64))
    output: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    reused: Mapped[bool] = mapped_column(Boolean, default=False)
    latency_ms: Mapped[int] = mapped_column(Integer, default=0)
    cost_usd: Mapped[float | None] = mapped_column(Float, nullable=True)


class EvalResult(Base):
    """One evaluator's verdict on one model's output for one entry; ``opponent`` set: a pair."""

    __tablename__ = "eval_results"
    __table_args__ = (Index("ix_eval_results_eval_evaluator", "eval_id", "evaluator", "model"),)

    eval_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("evals.id", ondelete="CASCADE"), primary_key=True
    )
    entry_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    evaluator: Mapped[str] = mapped_column(String(200), primary_key=True)
    model: Mapped[str] = mapped_column(String(200), primary_key=True)
    opponent: Mapped[str] = mapped_column(String(200), primary_key=True, default="")
    score: Mapped[float | None] = mapped_column(Float, nullable=True)
    winner: Mapped[str | None] = mapped_column(String(200), nullable=True)
    explanation: Mapped[str | None] = mapped_column(Text, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    judge_calls: Mapped[int] = mapped_column(Integer, default=0)
    cost_usd: Mapped[float | None] = mapped_column(Float, nullable=True)


class EvalAppliedEvent(Base):
    """Events already applied: a re-delivered event finds its id here and is skipped."""

    __tablename__ = "eval_applied_events"

    event_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    eval_id: Mapped[str] = mapped_column(String(40), ForeignKey("evals.id", ondelete="CASCADE"), index=True)
