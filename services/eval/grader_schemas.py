"""The OpenAI grader objects (``seeds/openai-fine-tuning-api.txt``), validated as pydantic models.

Checks beyond the shapes (template namespaces, formulas, labels, metric data, Python source)
live in ``graders.validate_grader``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

TEXT_METRICS = (
    "cosine",
    "fuzzy_match",
    "bleu",
    "gleu",
    "meteor",
    "rouge_1",
    "rouge_2",
    "rouge_3",
    "rouge_4",
    "rouge_5",
    "rouge_l",
)


class _Grader(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=256)


class StringCheckGrader(_Grader):
    type: Literal["string_check"]
    input: str = Field(description="the input text; may include template strings")
    reference: str = Field(description="the reference text; may include template strings")
    operation: Literal["eq", "ne", "like", "ilike"]


class TextSimilarityGrader(_Grader):
    type: Literal["text_similarity"]
    input: str
    reference: str
    evaluation_metric: Literal[
        "cosine",
        "fuzzy_match",
        "bleu",
        "gleu",
        "meteor",
        "rouge_1",
        "rouge_2",
        "rouge_3",
        "rouge_4",
        "rouge_5",
        "rouge_l",
    ]


class PythonGrader(_Grader):
    type: Literal["python"]
    source: str = Field(min_length=1, max_length=256_000, description="defines grade(sample, item) -> float")
    image_tag: str | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["input_text", "output_text", "input_image", "input_audio"]
    text: str | None = None
    image_url: str | None = None
    detail: str | None = None
    input_audio: dict[str, Any] | None = None


class GraderMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["user", "assistant", "system", "developer"]
    content: str | ContentPart | list[str | ContentPart]
    type: Literal["message"] | None = None


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_completions_tokens: int | None = Field(None, ge=1)
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    seed: int | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)


class ScoreModelGrader(_Grader):
    type: Literal["score_model"]
    input: list[GraderMessage] = Field(min_length=1)
    model: str = Field(min_length=1)
    range: list[float] | None = Field(None, description="[low, high]; defaults to [0, 1]")
    sampling_params: SamplingParams | None = None

    @field_validator("range")
    @classmethod
    def _range(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and (len(value) != 2 or value[0] >= value[1]):
            raise ValueError("range must be [low, high] with low < high")
        return value


class LabelModelGrader(_Grader):
    type: Literal["label_model"]
    input: list[GraderMessage] = Field(min_length=1)
    model: str = Field(min_length=1)
    labels: list[str] = Field(min_length=1)
    passing_labels: list[str] = Field(min_length=1)
    sampling_params: SamplingParams | None = None

    @field_validator("passing_labels")
    @classmethod
    def _subset(cls, value: list[str], info: Any) -> list[str]:
        labels = info.data.get("labels") or []
        unknown = [label for label in value if label not in labels]
        if unknown:
            raise ValueError(f"passing_labels must be a subset of labels; not in labels: {unknown}")
        return value


SubGrader = Annotated[
    StringCheckGrader | TextSimilarityGrader | PythonGrader | ScoreModelGrader | LabelModelGrader,
    Field(discriminator="type"),
]


class MultiGrader(_Grader):
    type: Literal["multi"]
    calculate_output: str = Field(min_length=1, max_length=4096)
    graders: dict[str, SubGrader] = Field(min_length=1, description="sub-graders by formula variable name")

    @field_validator("graders", mode="before")
    @classmethod
    def _single(cls, value: Any) -> Any:
        # The SDK's types show one grader object; a mapping of names to graders is the usual form.
        if isinstance(value, dict) and "type" in value and isinstance(value.get("type"), str):
            return {str(value.get("name") or value["type"]): value}
        if isinstance(value, list):
            return {str(g.get("name")) if isinstance(g, dict) else str(i): g for i, g in enumerate(value)}
        return value


Grader = Annotated[
    StringCheckGrader
    | TextSimilarityGrader
    | PythonGrader
    | ScoreModelGrader
    | LabelModelGrader
    | MultiGrader,
    Field(discriminator="type"),
]


class GraderHolder(BaseModel):
    """``POST /fine_tuning/alpha/graders/validate``."""

    model_config = ConfigDict(extra="forbid")

    grader: Grader


class GraderRunRequest(BaseModel):
    """``POST /fine_tuning/alpha/graders/run``."""

    model_config = ConfigDict(extra="forbid")

    grader: Grader
    model_sample: str = Field(description="fills the sample namespace; output_json when it parses as JSON")
    item: Any = None
