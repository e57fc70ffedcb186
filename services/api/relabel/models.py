"""Relabel jobs: the request schema and the per-entry outcome table that makes results idempotent."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import DateTime, ForeignKey, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from services.common.db import Base


class RelabelOutcome(Base):
    """One row per (job, entry) once its result is applied: a re-delivered result finds it and is skipped."""

    __tablename__ = "relabel_outcomes"

    job_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("dataset_jobs.id", ondelete="CASCADE"), primary_key=True
    )
    entry_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    status: Mapped[str] = mapped_column(String(16))  # relabeled | failed | skipped
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class RelabelStart(BaseModel):
    """``POST /datasets/{id}/relabel``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    model: str = Field(
        min_length=1, description="any routable model, e.g. gpt-4o, anthropic:..., openpipe:moa-..."
    )
    filters: dict[str, Any] = Field(
        default_factory=dict, description="entry filters: split, provenance, source, search, metadata"
    )
    entry_ids: list[str] | None = Field(default=None, alias="entryIds", max_length=100_000)
    track_rejected: bool = Field(
        default=False,
        alias="trackRejected",
        description="keep each replaced output as the entry's rejected_message",
    )
