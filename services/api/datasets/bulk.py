"""Dataset entries as driver rows, inserted with multi-row statements (the mechanism behind
``service.insert_entries``, which decides what is a duplicate).

Rows go to the driver as they are: JSON already serialized (orjson; ``None`` as JSON null, as
SQLAlchemy's JSON type stores it) and timestamps already in the driver's form, inserted with
multi-row ``INSERT ... VALUES (...), (...) ON CONFLICT (dataset_id, source_log_id) DO NOTHING``
statements. Per-row SQLAlchemy processing would cost more than the insert itself, and one
statement per row would hand the GIL back and forth with the event loop on every row (SQLite
runs in a thread); the statement's row count says how many were new.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from itertools import chain
from typing import Any

import orjson
from sqlalchemy import JSON
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection

from services.api.datasets.models import DatasetEntry

EntryRow = tuple[Any, ...]

_TABLE = DatasetEntry.__table__
_COLUMNS = tuple(c.name for c in _TABLE.columns)
_ATTRIBUTE = {c.name: attr.key for attr in DatasetEntry.__mapper__.column_attrs for c in attr.columns}
_JSON_COLUMNS = frozenset(c.name for c in _TABLE.columns if isinstance(c.type, JSON))
_TIME_COLUMNS = frozenset(("created_at", "updated_at"))
ID = _COLUMNS.index("id")
CONTENT_HASH = _COLUMNS.index("content_hash")
SOURCE_LOG_ID = _COLUMNS.index("source_log_id")
PLACEHOLDER_MOMENT = datetime(2000, 1, 1, tzinfo=UTC)  # for draft_values when entry_row sets the time
MAX_ROWS_PER_STATEMENT = 1500
MAX_PARAMETERS = 32_000  # SQLite (since 3.32) allows 32766 per statement, Postgres 32767


def driver_moment(dialect: Dialect, moment: datetime) -> Any:
    """``moment`` as the dialect's driver takes a ``created_at`` value."""
    processor = _TABLE.c.created_at.type.dialect_impl(dialect).bind_processor(dialect)
    return processor(moment) if processor is not None else moment


def entry_row(values: dict[str, Any], moment: Any) -> EntryRow:
    """``draft_values`` output as driver parameters in table column order; ``moment`` processed."""
    out = []
    for column in _COLUMNS:
        if column in _TIME_COLUMNS:
            out.append(moment)
        elif column in _JSON_COLUMNS:
            out.append(orjson.dumps(values[_ATTRIBUTE[column]]).decode())
        else:
            out.append(values[_ATTRIBUTE[column]])
    return tuple(out)


class BulkInsert:
    """Multi-row inserts of :func:`entry_row` tuples: few statements, so few round trips.

    The SQL is written out here rather than compiled per row count: every row count needs its
    own statement, and compiling thousands of bound parameters costs more than running them.
    SQLite (``?``) and Postgres drivers (``$n``, ``%s``) are supported; the target columns are
    quoted by the dialect.
    """

    PLACEHOLDERS: dict[str, Callable[[int], str]] = {
        "qmark": lambda _: "?",
        "numeric_dollar": lambda k: f"${k}",
        "numeric": lambda k: f":{k}",
        "format": lambda _: "%s",
    }

    def __init__(self, dialect: Dialect) -> None:
        if dialect.paramstyle not in self.PLACEHOLDERS:  # pragma: no cover - sqlite3, asyncpg, psycopg
            raise NotImplementedError(f"bulk insert for the {dialect.paramstyle!r} paramstyle")
        self.dialect = dialect
        self.rows_per_statement = max(1, min(MAX_ROWS_PER_STATEMENT, MAX_PARAMETERS // len(_COLUMNS)))
        quote = dialect.identifier_preparer.quote
        self._head = (
            f"INSERT INTO {dialect.identifier_preparer.format_table(_TABLE)} "
            f"({', '.join(quote(c) for c in _COLUMNS)}) VALUES "
        )
        self._tail = f" ON CONFLICT ({quote('dataset_id')}, {quote('source_log_id')}) DO NOTHING"
        self._statements: dict[int, str] = {}

    def statement(self, n: int) -> str:
        """The SQL for ``n`` rows (the full-size one is kept; a remainder is written each time)."""
        if n in self._statements:
            return self._statements[n]
        placeholder, width = self.PLACEHOLDERS[self.dialect.paramstyle], len(_COLUMNS)
        rows = ("(" + ", ".join(placeholder(i * width + j + 1) for j in range(width)) + ")" for i in range(n))
        sql = self._head + ", ".join(rows) + self._tail
        if n == self.rows_per_statement:
            self._statements[n] = sql
        return sql

    async def insert(self, connection: AsyncConnection, rows: list[EntryRow]) -> int:
        """Insert ``rows``; returns how many were new (the others' source log was already there)."""
        inserted = 0
        for start in range(0, len(rows), self.rows_per_statement):
            chunk = rows[start : start + self.rows_per_statement]
            result = await connection.exec_driver_sql(
                self.statement(len(chunk)), tuple(chain.from_iterable(chunk))
            )
            inserted += max(result.rowcount, 0)
        return inserted


_BULK: dict[str, BulkInsert] = {}


def bulk_insert_for(dialect: Dialect) -> BulkInsert:
    key = f"{dialect.name}+{dialect.driver}"
    if key not in _BULK:
        _BULK[key] = BulkInsert(dialect)
    return _BULK[key]
