"""The catalog's projects and keys on both databases it supports: SQLite and Postgres."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy.exc import IntegrityError

from services.api.projects import service as projects
from services.common.auth import hash_api_key
from services.common.db import make_engine, make_sessionmaker, migrate


async def test_migrations_projects_and_keys(database_url: str) -> None:
    await migrate(database_url)
    await migrate(database_url)  # idempotent
    engine = make_engine(database_url)
    sessions = make_sessionmaker(engine)
    try:
        async with sessions.begin() as session:
            assert await projects.ensure_bootstrap_project(session=session, api_key="opk_boot") is True
        async with sessions.begin() as session:
            assert await projects.ensure_bootstrap_project(session=session, api_key="opk_other") is False
            project = await projects.create_project(session=session, name="team")
            row, plain = await projects.add_api_key(session=session, project_id=project.id)
        assert plain.startswith("opk_") and row.key_hash == hash_api_key(plain) and row.prefix == plain[:8]
        async with sessions() as session:
            keys = await projects.active_keys(session=session)
            assert {k.key_hash for k in keys} == {hash_api_key("opk_boot"), hash_api_key(plain)}
            record = projects.key_record(row)
            assert record.key == f"api_key/{row.key_hash}" and record.data == {"project_id": project.id}
        with pytest.raises(IntegrityError):
            async with sessions.begin() as session:
                await projects.create_project(session=session, name="team")
        async with sessions() as session:  # the failed transaction left nothing behind
            assert await projects.get_project_by_name(session=session, name="team") is not None
            assert len(await projects.active_keys(session=session)) == 2
    finally:
        await engine.dispose()


async def test_sqlite_connections_get_the_catalogs_settings(tmp_path: Path) -> None:
    """Each pooled connection: WAL with synchronous=NORMAL, foreign keys on, a 64 MiB page cache and
    checkpoints at 32768 pages (bulk imports)."""
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'catalog.db'}")
    try:
        async with engine.connect() as connection:
            names = ("journal_mode", "synchronous", "foreign_keys", "cache_size", "wal_autocheckpoint")
            settings = {name: (await connection.exec_driver_sql(f"PRAGMA {name}")).scalar() for name in names}
    finally:
        await engine.dispose()
    assert settings == {
        "journal_mode": "wal",
        "synchronous": 1,
        "foreign_keys": 1,
        "cache_size": -65536,
        "wal_autocheckpoint": 32768,
    }
