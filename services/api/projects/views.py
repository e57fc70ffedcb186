"""Project routes: who am I, and mint another key for my project."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from services.api.projects import service
from services.api.projects.models import ApiKeyCreated, ProjectInfo
from services.common.auth import require_project
from services.common.errors import APIError

router = APIRouter(tags=["projects"])


@router.post("/keys", response_model=ApiKeyCreated, status_code=201)
async def create_key(request: Request, project_id: str = Depends(require_project)) -> ApiKeyCreated:
    async with request.app.state.sessions.begin() as session:
        row, plain = await service.add_api_key(session=session, project_id=project_id)
    request.app.state.keyring.add(row.key_hash, project_id)
    await service.publish_keys(broker=request.app.state.broker, keys=[row])
    return ApiKeyCreated(id=row.id, project_id=project_id, key=plain, created=row.created_at.isoformat())


@router.get("/project", response_model=ProjectInfo)
async def who_am_i(request: Request, project_id: str = Depends(require_project)) -> ProjectInfo:
    """The project the key belongs to: its id is what a Kafka producer puts in ``project_id``."""
    async with request.app.state.sessions() as session:
        project = await service.get_project(session=session, project_id=project_id)
    if project is None:
        raise APIError(404, "The key's project no longer exists.", type="invalid_request_error")
    return ProjectInfo(id=project.id, name=project.name, created=project.created_at.isoformat())
