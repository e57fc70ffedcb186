"""Pruning rules: the wire schemas (the table is ``services.api.pruning.models.PruningRule``).

A dataset's rules are ordered (``position`` 0, 1, ...) and applied in that order: each rule's
text is removed literally from every input message; a message left empty is dropped unless it
carries tool calls (``services.common.pruning.apply_pruning_rules``, the same code the router
runs on requests to a model trained with those rules).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from services.api.pruning.models import PruningRule
from services.common.clock import iso

MAX_RULES_PER_DATASET = 100  # a deployment carries at most this many (``DeploymentSpec.pruningRules``)
MAX_RULE_CHARS = 65536
PREVIEW_DEFAULT_ENTRIES = 20
PREVIEW_MAX_ENTRIES = 100

RuleText = Annotated[str, StringConstraints(min_length=1, max_length=MAX_RULE_CHARS)]


class PruningRuleCreate(BaseModel):
    """``position`` absent (or past the end): appended; otherwise inserted there, later rules shift."""

    model_config = ConfigDict(extra="forbid")

    text: RuleText
    position: int | None = Field(default=None, ge=0, le=2**31 - 1)


class PruningRuleUpdate(BaseModel):
    """Absent fields are unchanged; a new ``position`` moves the rule (clamped to the last place)."""

    model_config = ConfigDict(extra="forbid")

    text: RuleText | None = None
    position: int | None = Field(default=None, ge=0, le=2**31 - 1)

    @field_validator("text", "position", mode="before")
    @classmethod
    def _not_null(cls, value: object) -> object:
        if value is None:
            raise ValueError("cannot be null; leave the field out to keep it")
        return value


class PreviewRequest(BaseModel):
    """``rule_ids`` absent: every rule of the dataset; given: those rules, in the dataset's order."""

    model_config = ConfigDict(extra="forbid")

    rule_ids: list[str] | None = Field(default=None, max_length=MAX_RULES_PER_DATASET)
    limit: int = Field(default=PREVIEW_DEFAULT_ENTRIES, ge=0, le=PREVIEW_MAX_ENTRIES)


class PruningRuleOut(BaseModel):
    object: Literal["pruning_rule"] = "pruning_rule"
    id: str
    dataset_id: str
    position: int
    text: str
    created: str


class PruningRuleList(BaseModel):
    object: Literal["list"] = "list"
    data: list[PruningRuleOut]


class PruningRuleDeleted(BaseModel):
    id: str
    object: Literal["pruning_rule"] = "pruning_rule"
    deleted: Literal[True] = True


class EntryPreview(BaseModel):
    """One entry's input before and after pruning (tokens: ~4 characters each, as everywhere)."""

    entry_id: str
    affected: bool
    tokens_before: int
    tokens_after: int
    tokens_saved: int
    messages: list[dict[str, Any]] = Field(description="the input messages after pruning")


class PreviewTotals(BaseModel):
    entries: int
    entries_affected: int
    tokens_before: int
    tokens_after: int
    tokens_saved: int


class PreviewOut(BaseModel):
    object: Literal["pruning_rules.preview"] = "pruning_rules.preview"
    dataset_id: str
    rule_ids: list[str] = Field(description="the rules applied, in order")
    totals: PreviewTotals = Field(description="over every entry of the dataset")
    data: list[EntryPreview] = Field(description="the first entries (oldest first)")


def rule_out(rule: PruningRule) -> PruningRuleOut:
    return PruningRuleOut(
        id=rule.id,
        dataset_id=rule.dataset_id,
        position=rule.position,
        text=rule.text,
        created=iso(rule.created_at),
    )
