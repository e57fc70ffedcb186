"""Projects and API keys: plain functions over a session, plus catalog publication."""

from __future__ import annotations

from faststream.kafka import KafkaBroker
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from services.api.projects.models import ApiKey, Project
from services.common.auth import API_KEY_KIND, generate_api_key, hash_api_key
from services.common.clock import now
from services.common.events import CATALOG_TOPIC, CatalogRecord
from services.common.ids import new_id


async def get_project_by_name(*, session: AsyncSession, name: str) -> Project | None:
    return await session.scalar(select(Project).where(Project.name == name))


async def get_project(*, session: AsyncSession, project_id: str) -> Project | None:
    return await session.get(Project, project_id)


async def list_projects(*, session: AsyncSession) -> list[Project]:
    return list(await session.scalars(select(Project).order_by(Project.created_at)))


async def create_project(*, session: AsyncSession, name: str) -> Project:
    project = Project(id=new_id("proj"), name=name, created_at=now())
    session.add(project)
    await session.flush()
    return project


async def add_api_key(
    *, session: AsyncSession, project_id: str, key: str | None = None
) -> tuple[ApiKey, str]:
    """Store a key (minted unless given) by hash; returns the row and the plain key."""
    plain = key or generate_api_key()
    row = ApiKey(
        id=new_id("key"),
        project_id=project_id,
        key_hash=hash_api_key(plain),
        prefix=plain[:8],
        created_at=now(),
    )
    session.add(row)
    await session.flush()
    return row, plain


async def ensure_bootstrap_project(*, session: AsyncSession, api_key: str, name: str = "default") -> bool:
    """On first start (no project at all) create one owning ``api_key``. True if created."""
    if await session.scalar(select(Project.id).limit(1)) is not None:
        return False
    project = await create_project(session=session, name=name)
    await add_api_key(session=session, project_id=project.id, key=api_key)
    return True


async def active_keys(*, session: AsyncSession) -> list[ApiKey]:
    return list(await session.scalars(select(ApiKey).where(ApiKey.revoked_at.is_(None))))


def key_record(key: ApiKey) -> CatalogRecord:
    return CatalogRecord(kind=API_KEY_KIND, id=key.key_hash, data={"project_id": key.project_id})


async def publish_keys(*, broker: KafkaBroker, keys: list[ApiKey]) -> None:
    """Publish keys on ``catalog.v1`` so every hot-path service can authenticate without Postgres."""
    for key in keys:
        record = key_record(key)
        await broker.publish(record.model_dump(mode="json"), CATALOG_TOPIC, key=record.key.encode())
