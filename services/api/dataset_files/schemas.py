"""Wire schemas of the dataset files API: exports and snapshots.

Upload jobs use the datasets domain's ``JobOut`` (polled at ``GET /datasets/{id}/jobs/{job_id}``);
the tables (``DatasetJob``, ``DatasetSnapshot``) live in ``services.api.datasets.models``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class DatasetExportOut(BaseModel):
    object: Literal["dataset.export"] = "dataset.export"
    dataset_id: str
    name: str
    uri: str
    url: str | None  # a presigned download URL (S3 blob stores), else null
    url_expires: str | None
    download: str  # the API route streaming it back: /api/v1/datasets/{id}/exports/{name}
    entry_count: int
    bytes: int
    created: str


class DatasetSnapshotOut(BaseModel):
    object: Literal["dataset.snapshot"] = "dataset.snapshot"
    id: str
    dataset_id: str
    content_hash: str
    uri: str
    entry_count: int
    created: str


class DatasetSnapshotList(BaseModel):
    object: Literal["list"] = "list"
    data: list[DatasetSnapshotOut]
