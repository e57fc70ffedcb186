"""Pruning rules: plain keyword-only functions over a session.

Rules belong to a dataset (and through it to a project: another project's rule is simply not
found). Positions are kept dense (0..n-1) in the order rules apply. A model or deployment gets
a *copy* of the rules' texts when it is created (:func:`texts_to_copy`), so editing a dataset's
rules later never changes what an existing model prunes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from services.api.datasets.models import Dataset, DatasetEntry
from services.api.datasets.rows import estimate_tokens
from services.api.datasets.service import get_dataset, lock_dataset
from services.api.providers.models import DeploymentSpec
from services.api.pruning.models import PruningRule
from services.api.pruning.schemas import (
    MAX_RULES_PER_DATASET,
    EntryPreview,
    PreviewOut,
    PreviewTotals,
)
from services.common.clock import now
from services.common.errors import bad_request, not_found
from services.common.ids import new_id
from services.common.pruning import apply_pruning_rules

PREVIEW_SCAN_ROWS = 1000  # entries fetched per round trip when totalling a preview


async def _ordered(*, session: AsyncSession, dataset_id: str) -> list[PruningRule]:
    """The dataset's rules as stored now (``populate_existing``: a rule read before the lock is
    refreshed, so renumbering starts from what concurrent edits committed)."""
    query = (
        select(PruningRule)
        .where(PruningRule.dataset_id == dataset_id)
        .order_by(PruningRule.position, PruningRule.created_at, PruningRule.id)
        .execution_options(populate_existing=True)
    )
    return list(await session.scalars(query))


def _renumber(rules: list[PruningRule]) -> None:
    for index, rule in enumerate(rules):
        if rule.position != index:
            rule.position = index


async def list_rules(*, session: AsyncSession, project_id: str, dataset_id: str) -> list[PruningRule]:
    await get_dataset(session=session, project_id=project_id, dataset_id=dataset_id)
    return await _ordered(session=session, dataset_id=dataset_id)


async def create_rule(
    *, session: AsyncSession, project_id: str, dataset_id: str, text: str, position: int | None
) -> PruningRule:
    dataset = await lock_dataset(session=session, project_id=project_id, dataset_id=dataset_id)
    rules = await _ordered(session=session, dataset_id=dataset_id)
    if len(rules) >= MAX_RULES_PER_DATASET:
        raise bad_request(
            f"A dataset has at most {MAX_RULES_PER_DATASET} pruning rules; delete one first.", param="text"
        )
    moment = now()
    rule = PruningRule(
        id=new_id("prr"), dataset_id=dataset_id, position=len(rules), text=text, created_at=moment
    )
    session.add(rule)
    rules.insert(len(rules) if position is None else min(position, len(rules)), rule)
    _renumber(rules)
    dataset.updated_at = moment
    await session.flush()
    return rule


async def get_rule(*, session: AsyncSession, project_id: str, rule_id: str) -> PruningRule:
    query = (
        select(PruningRule)
        .join(Dataset, Dataset.id == PruningRule.dataset_id)
        .where(PruningRule.id == rule_id, Dataset.project_id == project_id)
        .execution_options(populate_existing=True)
    )
    rule = await session.scalar(query)
    if rule is None:
        raise not_found(f"No pruning rule with id {rule_id!r} in this project.", param="rule_id")
    return rule


async def _lock_rule(*, session: AsyncSession, project_id: str, rule_id: str) -> tuple[PruningRule, Dataset]:
    """The rule and its dataset, the dataset's write lock held; the rule read again under it (a
    concurrent delete is a 404, not a stale row)."""
    rule = await get_rule(session=session, project_id=project_id, rule_id=rule_id)
    dataset = await lock_dataset(session=session, project_id=project_id, dataset_id=rule.dataset_id)
    return await get_rule(session=session, project_id=project_id, rule_id=rule_id), dataset


async def update_rule(
    *,
    session: AsyncSession,
    project_id: str,
    rule_id: str,
    text: str | None = None,
    position: int | None = None,
) -> PruningRule:
    rule, dataset = await _lock_rule(session=session, project_id=project_id, rule_id=rule_id)
    if text is not None:
        rule.text = text
    if position is not None:
        rules = [r for r in await _ordered(session=session, dataset_id=rule.dataset_id) if r.id != rule.id]
        rules.insert(min(position, len(rules)), rule)
        _renumber(rules)
    dataset.updated_at = now()
    await session.flush()
    return rule


async def delete_rule(*, session: AsyncSession, project_id: str, rule_id: str) -> None:
    rule, dataset = await _lock_rule(session=session, project_id=project_id, rule_id=rule_id)
    await session.delete(rule)
    await session.flush()
    _renumber(await _ordered(session=session, dataset_id=rule.dataset_id))
    dataset.updated_at = now()
    await session.flush()


async def select_rules(
    *,
    session: AsyncSession,
    project_id: str,
    dataset_id: str,
    rule_ids: list[str] | None,
    param: str = "rule_ids",
) -> list[PruningRule]:
    """The dataset's rules (``rule_ids`` None) or the named ones, in the dataset's order.

    An id that is not a rule of this dataset is a 400 naming ``<param>.<index>``.
    """
    rules = await list_rules(session=session, project_id=project_id, dataset_id=dataset_id)
    if rule_ids is None:
        return rules
    by_id = {rule.id: rule for rule in rules}
    for index, rule_id in enumerate(rule_ids):
        if rule_id not in by_id:
            raise bad_request(
                f"{rule_id!r} is not a pruning rule of dataset {dataset_id!r}.", param=f"{param}.{index}"
            )
    wanted = set(rule_ids)
    return [rule for rule in rules if rule.id in wanted]


async def texts_to_copy(
    *, session: AsyncSession, project_id: str, dataset_id: str, rule_ids: list[str] | None
) -> list[str]:
    """The rule texts a model (or deployment) takes from its dataset, frozen at this moment."""
    dataset = await session.get(Dataset, dataset_id)
    if dataset is None or dataset.project_id != project_id:
        raise not_found(f"No dataset with id {dataset_id!r} in this project.", param="datasetId")
    rules = await select_rules(
        session=session,
        project_id=project_id,
        dataset_id=dataset_id,
        rule_ids=rule_ids,
        param="pruningRuleIds",
    )
    return [rule.text for rule in rules]


async def rules_for_deployment(
    *, session: AsyncSession, project_id: str, spec: DeploymentSpec
) -> list[str] | None:
    """``PUT /deployments/{slug}`` with ``datasetId`` (+ ``pruningRuleIds``): the texts to copy.

    ``None`` when the body names no dataset (its ``pruningRules`` texts apply as given).
    """
    if spec.datasetId is None:
        if spec.pruningRuleIds is not None:
            raise bad_request(
                "pruningRuleIds needs datasetId: the dataset the rules belong to.", param="datasetId"
            )
        return None
    if spec.pruningRules:
        raise bad_request(
            "Send either pruningRules (texts) or datasetId with pruningRuleIds, not both.",
            param="pruningRules",
        )
    return await texts_to_copy(
        session=session, project_id=project_id, dataset_id=spec.datasetId, rule_ids=spec.pruningRuleIds
    )


# --- preview -------------------------------------------------------------------------------------


@dataclass
class _Totals:
    entries: int = 0
    affected: int = 0
    before: int = 0
    after: int = 0
    samples: list[EntryPreview] = field(default_factory=list)


async def preview(
    *, session: AsyncSession, project_id: str, dataset_id: str, rule_ids: list[str] | None, limit: int
) -> PreviewOut:
    """What the rules do to the dataset's inputs: the first ``limit`` entries in full, totals over all."""
    rules = await select_rules(
        session=session, project_id=project_id, dataset_id=dataset_id, rule_ids=rule_ids
    )
    texts = tuple(rule.text for rule in rules)
    totals = _Totals()
    query = (
        select(DatasetEntry.id, DatasetEntry.messages)
        .where(DatasetEntry.dataset_id == dataset_id)
        .order_by(DatasetEntry.created_at, DatasetEntry.id)
        .execution_options(yield_per=PREVIEW_SCAN_ROWS)
    )
    result = await session.stream(query)
    async for partition in result.partitions():
        for entry_id, messages in partition:
            pruned = apply_pruning_rules(messages, texts)
            before = estimate_tokens(messages)
            after = before if pruned is messages else estimate_tokens(pruned)
            affected = pruned != messages
            totals.entries += 1
            totals.affected += affected
            totals.before += before
            totals.after += after
            if len(totals.samples) < limit:
                totals.samples.append(
                    EntryPreview(
                        entry_id=entry_id,
                        affected=affected,
                        tokens_before=before,
                        tokens_after=after,
                        tokens_saved=before - after,
                        messages=pruned,
                    )
                )
    return PreviewOut(
        dataset_id=dataset_id,
        rule_ids=[rule.id for rule in rules],
        totals=PreviewTotals(
            entries=totals.entries,
            entries_affected=totals.affected,
            tokens_before=totals.before,
            tokens_after=totals.after,
            tokens_saved=totals.before - totals.after,
        ),
        data=totals.samples,
    )
