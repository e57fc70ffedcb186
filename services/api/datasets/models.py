"""Datasets: tables and the wire schemas of the datasets API.

An entry stores its input (``messages`` without the final answer, ``tools``, ...) apart from
its ``output`` (the assistant message it should produce), so relabeling replaces only the
output. Every replaced output is kept as a revision; ``provenance`` says where the current
output came from.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from sqlalchemy import JSON, DateTime, ForeignKey, Index, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from services.common.db import Base

Split = Literal["TRAIN", "TEST"]
Provenance = Literal["upload", "api", "request_log", "relabeled_by_model", "relabeled_by_human"]
JobKind = Literal["upload", "import_logs", "relabel", "export"]
JobStatus = Literal["queued", "running", "succeeded", "partial", "failed"]


class Dataset(Base):
    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("projects.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class DatasetEntry(Base):
    __tablename__ = "dataset_entries"
    __table_args__ = (
        UniqueConstraint("dataset_id", "source_log_id", name="uq_dataset_entries_source_log"),
        Index("ix_dataset_entries_dataset_split", "dataset_id", "split"),
        Index("ix_dataset_entries_dataset_hash", "dataset_id", "content_hash"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    dataset_id: Mapped[str] = mapped_column(String(40), ForeignKey("datasets.id", ondelete="CASCADE"))
    # sha256 of the canonical input: decides the automatic split and finds duplicates
    content_hash: Mapped[str] = mapped_column(String(64))
    split: Mapped[str] = mapped_column(String(8))
    messages: Mapped[list[dict[str, Any]]] = mapped_column(JSON)  # the input, without the output
    tools: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, nullable=True)
    tool_choice: Mapped[Any] = mapped_column(JSON, nullable=True)
    response_format: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    output: Mapped[dict[str, Any]] = mapped_column(JSON)  # the assistant message to learn
    rejected_message: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    entry_metadata: Mapped[dict[str, str]] = mapped_column("metadata", JSON, default=dict)
    source: Mapped[str] = mapped_column(String(16))  # upload | api | request_log
    source_log_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    provenance: Mapped[str] = mapped_column(String(24))
    relabel_model: Mapped[str | None] = mapped_column(String(200), nullable=True)
    revision: Mapped[int] = mapped_column(Integer, default=1)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    output_tokens: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class DatasetEntryRevision(Base):
    """An output an entry had before it was replaced (relabel or human edit)."""

    __tablename__ = "dataset_entry_revisions"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    entry_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("dataset_entries.id", ondelete="CASCADE"), index=True
    )
    revision: Mapped[int] = mapped_column(Integer)
    output: Mapped[dict[str, Any]] = mapped_column(JSON)
    rejected_message: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    provenance: Mapped[str] = mapped_column(String(24))
    relabel_model: Mapped[str | None] = mapped_column(String(200), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class DatasetJob(Base):
    """Long work on a dataset (upload parsing, log import, relabel, export) with its progress."""

    __tablename__ = "dataset_jobs"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("projects.id", ondelete="CASCADE"), index=True
    )
    dataset_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("datasets.id", ondelete="CASCADE"), index=True
    )
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    progress_done: Mapped[int] = mapped_column(Integer, default=0)
    progress_total: Mapped[int | None] = mapped_column(Integer, nullable=True)
    errors: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)  # capped, e.g. first 1000
    error_count: Mapped[int] = mapped_column(Integer, default=0)
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    result: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class DatasetSnapshot(Base):
    """An immutable, content-addressed JSONL of a dataset with its pruning rules applied."""

    __tablename__ = "dataset_snapshots"
    __table_args__ = (UniqueConstraint("dataset_id", "content_hash", name="uq_dataset_snapshots_content"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    content_hash: Mapped[str] = mapped_column(String(64))  # sha256 of the JSONL bytes; names the blob
    dataset_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("datasets.id", ondelete="CASCADE"), index=True
    )
    uri: Mapped[str] = mapped_column(String(2048))
    entry_count: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
