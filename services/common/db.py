"""The control-plane catalog database: SQLAlchemy 2 async on Postgres or SQLite, Alembic migrations."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, TypeVar

import orjson
from sqlalchemy import event, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "api" / "migrations"


class Base(DeclarativeBase):
    pass


T = TypeVar("T", bound=Base)


def _json_text(value: Any) -> str:
    return orjson.dumps(value).decode()


# JSON columns (entries are mostly JSON) through orjson rather than the standard library's json:
# several times faster both ways, and what the bulk importers write already.
_JSON_CODEC = {"json_serializer": _json_text, "json_deserializer": orjson.loads}


def make_engine(url: str) -> AsyncEngine:
    if url.startswith("sqlite"):
        Path(url.split("///", 1)[1]).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, connect_args={"timeout": 30}, **_JSON_CODEC)

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            # WAL's usual pairing: a commit survives a crash of the process, not of the machine.
            cursor.execute("PRAGMA synchronous=NORMAL")
            # 64 MiB of page cache (default 2 MiB): bulk inserts touch the entry indexes at random.
            cursor.execute("PRAGMA cache_size=-65536")
            # Checkpoint the WAL at 128 MiB (default 4 MiB): a bulk transaction's tens of MiB of
            # pages then get copied once per few transactions, not once each (a 1M-log import:
            # ~51 s against ~58 s).
            cursor.execute("PRAGMA wal_autocheckpoint=32768")
            cursor.close()

        return engine
    return create_async_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10, **_JSON_CODEC)


async def hold_row_lock(session: AsyncSession, model: type[Base], row_id: str) -> None:
    """Hold the row's write lock until the transaction ends.

    A no-op UPDATE: it takes the row lock on Postgres and the write lock on SQLite, where
    ``FOR UPDATE`` does nothing and a plain read takes no lock, so two transactions (an event and
    a cancel, say) never both act on the same old state. ``model`` needs ``id`` and ``updated_at``.
    """
    await session.execute(
        update(model)
        .where(model.id == row_id)  # type: ignore[attr-defined]
        .values(updated_at=model.updated_at)  # type: ignore[attr-defined]
        .execution_options(synchronize_session=False)
    )


async def lock_row(session: AsyncSession, model: type[T], row_id: str) -> T | None:
    """The row as stored now, its write lock held until the transaction ends (None: no such row)."""
    await hold_row_lock(session, model, row_id)
    return await session.get(model, row_id, populate_existing=True)


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


def _alembic_upgrade(url: str) -> None:
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    command.upgrade(config, "head")


async def migrate(url: str) -> None:
    """Bring the schema to the latest Alembic revision (runs in a thread: env.py owns its loop)."""
    await asyncio.to_thread(_alembic_upgrade, url)
