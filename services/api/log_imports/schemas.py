"""Importing request logs into a dataset: the request body and the job it answers with.

The filters use the names of ``GET /logs`` query parameters, so a search a user ran on the
logs can be sent as is. The import itself is a ``DatasetJob`` of kind ``import_logs``,
answered and polled as ``services.api.datasets.schemas.JobOut``.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from services.common.events import MAX_UNIX_MS
from services.common.log_fields import LogStatus

JOB_KIND = "import_logs"
SOURCE = "request_log"

MetadataKey = Annotated[str, StringConstraints(min_length=1, max_length=200)]


class ImportFilters(BaseModel):
    """All set conditions AND together (as on ``GET /logs``)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    completionId: str | None = None
    status: LogStatus | None = None
    requestedAfter: int | None = Field(default=None, ge=0, le=MAX_UNIX_MS, description="unix ms, inclusive")
    requestedBefore: int | None = Field(default=None, ge=0, le=MAX_UNIX_MS, description="unix ms, exclusive")
    requestContains: str | None = Field(default=None, min_length=1)
    responseNotContains: str | None = Field(default=None, min_length=1)
    metadata: dict[MetadataKey, str] = Field(default_factory=dict, description="every pair must match")


class ImportLogsRequest(BaseModel):
    """``POST /datasets/{id}/import-logs``: import the matching logs, newest first, up to ``limit``."""

    model_config = ConfigDict(extra="forbid")

    filters: ImportFilters = Field(default_factory=ImportFilters)
    limit: int | None = Field(
        default=None, ge=1, le=2**32 - 1, description="at most this many logs; absent: all"
    )
