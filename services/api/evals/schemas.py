"""Evals: the wire schemas of ``/evals``."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.eval.grader_schemas import Grader

EvalStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL = ("succeeded", "failed", "cancelled")
ORIGINAL = "original"


class _Evaluator(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class CodeEvaluator(_Evaluator):
    type: Literal["code"]
    name: str = Field(min_length=1, max_length=200)
    source: str = Field(
        min_length=1,
        max_length=256_000,
        description="Python defining grader(messages, tools, tool_choice, generated_output, dataset_output) "
        "-> float in [0, 1]",
    )


class CriterionEvaluator(_Evaluator):
    type: Literal["criterion"]
    criterion: str = Field(min_length=1, max_length=200, description='"name" or "name@vN"')
    name: str | None = Field(None, max_length=200)


class HeadToHeadEvaluator(_Evaluator):
    type: Literal["head_to_head"]
    judge_model: str = Field(alias="judgeModel", min_length=1, max_length=200)
    instructions: str | None = Field(None, max_length=20_000)
    name: str | None = Field(None, max_length=200)


class GraderEvaluator(_Evaluator):
    type: Literal["grader"]
    grader: Grader
    name: str | None = Field(None, max_length=200)


Evaluator = Annotated[
    CodeEvaluator | CriterionEvaluator | HeadToHeadEvaluator | GraderEvaluator, Field(discriminator="type")
]


def evaluator_name(evaluator: Any) -> str:
    if evaluator.name:
        return evaluator.name
    if isinstance(evaluator, CriterionEvaluator):
        return evaluator.criterion
    if isinstance(evaluator, GraderEvaluator):
        return evaluator.grader.name
    return "head_to_head"


class GenerationSettings(BaseModel):
    """How outputs are generated; part of the key under which an output is reused."""

    model_config = ConfigDict(extra="forbid")

    temperature: float | None = Field(None, ge=0, le=2)
    max_tokens: int | None = Field(None, ge=1, le=1_000_000)
    seed: int | None = None


class EvalCreate(BaseModel):
    """``POST /evals``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(min_length=1, max_length=200)
    dataset_id: str = Field(alias="datasetId", min_length=1, max_length=40)
    split: Literal["TEST", "TRAIN"] = "TEST"
    sample: int | None = Field(None, ge=1, le=100_000, description="evaluate this many entries of the split")
    models: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(
        min_length=1,
        max_length=10,
        description='routable model names, and "original" for the dataset outputs',
    )
    evaluators: list[Evaluator] = Field(min_length=1, max_length=20)
    generation: GenerationSettings = Field(default_factory=GenerationSettings)

    @model_validator(mode="after")
    def _consistent(self) -> EvalCreate:
        if len(set(self.models)) != len(self.models):
            raise ValueError("models must not repeat")
        names = [evaluator_name(e) for e in self.evaluators]
        if len(set(names)) != len(names):
            raise ValueError(f"evaluator names must be unique (give each a name): {names}")
        if any(isinstance(e, HeadToHeadEvaluator) for e in self.evaluators) and len(self.models) < 2:
            raise ValueError("a head_to_head evaluator needs at least two models")
        return self


class Progress(BaseModel):
    done: int
    total: int


class EvalOut(BaseModel):
    id: str
    object: Literal["eval"] = "eval"
    name: str
    datasetId: str
    split: str
    sample: int | None
    models: list[str]
    evaluators: list[dict[str, Any]]
    status: EvalStatus
    progress: Progress
    estimatedCost: dict[str, Any]
    error: str | None
    created: str
    updated: str
    finishedAt: str | None


class EvalList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EvalOut]


class EvalDeleted(BaseModel):
    id: str
    object: Literal["eval"] = "eval"
    deleted: bool = True
