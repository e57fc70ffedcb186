"""Every catalog table, imported in one place so Alembic sees them all."""

from services.api.criteria.models import (
    AlignmentJob,
    AlignmentJudgement,
    AlignmentRow,
    Criterion,
    CriterionVersion,
    Judgement,
)
from services.api.datasets.models import (
    Dataset,
    DatasetEntry,
    DatasetEntryRevision,
    DatasetJob,
    DatasetSnapshot,
    PruningRule,
)
from services.api.projects.models import ApiKey, Project
from services.api.providers.models import Deployment, ExternalModel, ExternalProvider, ProviderKeys

__all__ = [
    "AlignmentJob",
    "AlignmentJudgement",
    "AlignmentRow",
    "Criterion",
    "CriterionVersion",
    "Judgement",
    "ApiKey",
    "Dataset",
    "DatasetEntry",
    "DatasetEntryRevision",
    "DatasetJob",
    "DatasetSnapshot",
    "Deployment",
    "ExternalModel",
    "ExternalProvider",
    "PruningRule",
    "ProviderKeys",
    "Project",
]
