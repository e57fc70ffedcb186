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
)
from services.api.evals.models import Eval, EvalAppliedEvent, EvalOutputRecord, EvalResult, EvalRowOutput
from services.api.fine_tuning.models import FineTunedModel, JobCheckpoint, JobEvent, TrainingFile, TrainingJob
from services.api.projects.models import ApiKey, Project
from services.api.providers.models import Deployment, ExternalModel, ExternalProvider, ProviderKeys
from services.api.pruning.models import PruningRule
from services.api.relabel.models import RelabelOutcome

__all__ = [
    "Eval",
    "EvalAppliedEvent",
    "EvalOutputRecord",
    "EvalResult",
    "EvalRowOutput",
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
    "FineTunedModel",
    "JobCheckpoint",
    "JobEvent",
    "TrainingFile",
    "TrainingJob",
    "PruningRule",
    "ProviderKeys",
    "Project",
    "RelabelOutcome",
]
