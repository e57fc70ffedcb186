"""Pruning-rule routes (thin): a dataset's ordered rules and a preview of their effect."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.api.pruning import service
from services.api.pruning.schemas import (
    PreviewOut,
    PreviewRequest,
    PruningRuleCreate,
    PruningRuleDeleted,
    PruningRuleList,
    PruningRuleOut,
    PruningRuleUpdate,
    rule_out,
)
from services.common.auth import require_project

router = APIRouter(tags=["pruning rules"])


def sessions(request: Request) -> async_sessionmaker[AsyncSession]:
    return request.app.state.sessions


@router.get("/datasets/{dataset_id}/pruning-rules", response_model=PruningRuleList)
async def list_pruning_rules(
    dataset_id: str,
    db: async_sessionmaker[AsyncSession] = Depends(sessions),
    project_id: str = Depends(require_project),
) -> PruningRuleList:
    async with db() as session:
        rules = await service.list_rules(session=session, project_id=project_id, dataset_id=dataset_id)
    return PruningRuleList(data=[rule_out(rule) for rule in rules])


@router.post("/datasets/{dataset_id}/pruning-rules", response_model=PruningRuleOut, status_code=201)
async def create_pruning_rule(
    dataset_id: str,
    body: PruningRuleCreate,
    db: async_sessionmaker[AsyncSession] = Depends(sessions),
    project_id: str = Depends(require_project),
) -> PruningRuleOut:
    async with db.begin() as session:
        rule = await service.create_rule(
            session=session,
            project_id=project_id,
            dataset_id=dataset_id,
            text=body.text,
            position=body.position,
        )
    return rule_out(rule)


@router.post("/datasets/{dataset_id}/pruning-rules/preview", response_model=PreviewOut)
async def preview_pruning_rules(
    dataset_id: str,
    body: PreviewRequest,
    db: async_sessionmaker[AsyncSession] = Depends(sessions),
    project_id: str = Depends(require_project),
) -> PreviewOut:
    async with db() as session:
        return await service.preview(
            session=session,
            project_id=project_id,
            dataset_id=dataset_id,
            rule_ids=body.rule_ids,
            limit=body.limit,
        )


@router.patch("/pruning-rules/{rule_id}", response_model=PruningRuleOut)
async def update_pruning_rule(
    rule_id: str,
    body: PruningRuleUpdate,
    db: async_sessionmaker[AsyncSession] = Depends(sessions),
    project_id: str = Depends(require_project),
) -> PruningRuleOut:
    async with db.begin() as session:
        rule = await service.update_rule(
            session=session, project_id=project_id, rule_id=rule_id, text=body.text, position=body.position
        )
    return rule_out(rule)


@router.delete("/pruning-rules/{rule_id}", response_model=PruningRuleDeleted)
async def delete_pruning_rule(
    rule_id: str,
    db: async_sessionmaker[AsyncSession] = Depends(sessions),
    project_id: str = Depends(require_project),
) -> PruningRuleDeleted:
    async with db.begin() as session:
        await service.delete_rule(session=session, project_id=project_id, rule_id=rule_id)
    return PruningRuleDeleted(id=rule_id)
