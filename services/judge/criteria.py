"""Criteria as the judge (and the router) know them, materialized from ``catalog.v1``.

The api publishes one ``criterion`` record per criterion (id ``<project_id>/<name>``) holding
every version, so ``name`` (latest) and ``name@vN`` (pinned) both resolve from memory; a
deleted criterion is a tombstone (``deleted: true``).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from services.common.errors import APIError, not_found
from services.common.events import CRITERION_KIND, CatalogRecord

TEMPLATED_VARIABLES = ("messages", "tools", "tool_choice", "output")
CRITERION_ID = re.compile(r"^(?P<name>[^@]+?)(?:@v(?P<version>[0-9]+))?$")


@dataclass(frozen=True)
class CriterionVersion:
    project_id: str
    name: str
    version: int
    model: str
    prompt: str
    templated_variables: tuple[str, ...] = TEMPLATED_VARIABLES

    @property
    def id(self) -> str:
        return f"{self.name}@v{self.version}"


def parse_criterion_id(criterion_id: str) -> tuple[str, int | None]:
    """``"name"`` → (name, None); ``"name@v3"`` → (name, 3); anything else is a 404 naming it."""
    match = CRITERION_ID.match(criterion_id.strip())
    if not match:
        raise criterion_not_found(criterion_id)
    version = match.group("version")
    return match.group("name"), int(version) if version else None


def criterion_not_found(criterion_id: str, detail: str = "") -> APIError:
    error = not_found(
        f"No criterion {criterion_id!r} in this project{detail}. Use 'name' (latest) or 'name@vN'.",
        param="criterion_id",
    )
    error.code = "criterion_not_found"
    return error


def _versions(record: CatalogRecord) -> dict[int, CriterionVersion]:
    data = record.data
    return {
        int(v["version"]): CriterionVersion(
            project_id=data["project_id"],
            name=data["name"],
            version=int(v["version"]),
            model=v["model"],
            prompt=v["prompt"],
            templated_variables=tuple(v.get("templated_variables") or TEMPLATED_VARIABLES),
        )
        for v in data.get("versions") or []
    }


class CriteriaCatalog:
    def __init__(self, sync: Callable[[], Awaitable[object]] | None = None) -> None:
        self._criteria: dict[tuple[str, str], dict[int, CriterionVersion]] = {}
        self._sync = sync

    def apply(self, record: CatalogRecord) -> None:
        if record.kind != CRITERION_KIND:
            return
        project_id, _, name = record.id.partition("/")
        if record.deleted:
            self._criteria.pop((project_id, name), None)
        else:
            self._criteria[(project_id, name)] = _versions(record)

    def find(self, project_id: str, criterion_id: str) -> CriterionVersion:
        """The version ``criterion_id`` names, or a 404 ``criterion_not_found``."""
        name, version = parse_criterion_id(criterion_id)
        versions = self._criteria.get((project_id, name))
        if not versions:
            raise criterion_not_found(criterion_id)
        if version is None:
            return versions[max(versions)]
        if version not in versions:
            raise criterion_not_found(criterion_id, f" (it has versions 1 to {max(versions)})")
        return versions[version]

    async def resolve(self, project_id: str, criterion_id: str) -> CriterionVersion:
        """``find``, but a miss first waits for the catalog to catch up (read your writes: the
        api may have created the criterion a moment ago) before it is a 404."""
        try:
            return self.find(project_id, criterion_id)
        except APIError:
            if self._sync is None:
                raise
        await self._sync()
        return self.find(project_id, criterion_id)


def catalog_sync(reader: object, *, timeout: float = 2.0) -> Callable[[], Awaitable[object]]:
    """Waits for ``reader`` (a ``CatalogReader``) to apply what was published before the call:
    its ``sync`` when it has one, else a short pause."""
    sync = getattr(reader, "sync", None)

    async def wait() -> object:
        if sync is not None:
            return await sync(timeout=timeout)
        await asyncio.sleep(0.5)
        return None

    return wait
