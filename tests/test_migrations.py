"""The Alembic migrations build exactly the tables the models declare, on SQLite and Postgres."""

from __future__ import annotations

import importlib
import pkgutil

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

import services.api
from services.api import models as catalog_models
from services.common.db import Base, make_engine, migrate


def import_every_models_module() -> None:
    """Every ``services.api.<domain>.models``, found on disk rather than trusted from one list."""
    for module in pkgutil.walk_packages(services.api.__path__, "services.api."):
        if module.name.endswith(".models"):
            importlib.import_module(module.name)


def test_the_catalog_models_module_names_every_table() -> None:
    import_every_models_module()
    mapped = {mapper.class_.__name__ for mapper in Base.registry.mappers}
    assert mapped - set(catalog_models.__all__) == set()


async def test_migrations_match_every_model(database_url: str) -> None:
    import_every_models_module()
    await migrate(database_url)
    engine = make_engine(database_url)
    try:
        async with engine.connect() as connection:

            def diff(sync_connection) -> list:  # type: ignore[no-untyped-def]
                return compare_metadata(MigrationContext.configure(sync_connection), Base.metadata)

            assert await connection.run_sync(diff) == []
    finally:
        await engine.dispose()
