"""ClickHouse through ``clickhouse-connect`` for both a server (``http(s)://``) and chDB (``chdb:///path``).

chDB has no async client, and a server client would block the event loop too, so
every call runs in a worker thread. Both backends are safe to call from several threads.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import clickhouse_connect
from clickhouse_connect.driver.client import Client

log = logging.getLogger(__name__)


def connect(url: str) -> Client:
    """Open a client for ``http(s)://user:pass@host:port/database`` or ``chdb:///path``."""
    scheme = urlsplit(url).scheme
    if scheme == "chdb":
        return clickhouse_connect.get_client(dsn=url)
    if scheme in ("http", "https", "clickhouse"):
        # One client serves concurrent threads only without a shared session id.
        return clickhouse_connect.get_client(dsn=url, autogenerate_session_id=False)
    raise ValueError(f"unsupported ClickHouse URL scheme {scheme!r}: use http(s):// or chdb:///path")


class ClickHouse:
    """An async face over a ``clickhouse-connect`` client; opened lazily, reopened after errors."""

    def __init__(self, url: str, database: str = "distillery") -> None:
        self.url = url
        self.database = database
        self._client: Client | None = None

    def _get(self) -> Client:
        if self._client is None:
            self._client = connect(self.url)
        return self._client

    def _run(self, fn: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return getattr(self._get(), fn)(*args, **kwargs)
        except Exception:
            if urlsplit(self.url).scheme != "chdb":
                self._client = None  # a server connection may be broken: reconnect next time
            raise

    async def command(self, sql: str, parameters: dict | None = None) -> Any:
        return await asyncio.to_thread(self._run, "command", sql, parameters=parameters)

    async def query_rows(self, sql: str, parameters: dict | None = None) -> list[tuple]:
        """Rows made in the worker thread too: the transposition is Python work the loop is spared."""
        return await asyncio.to_thread(lambda: self._run("query", sql, parameters=parameters).result_rows)

    async def query_dicts(self, sql: str, parameters: dict | None = None) -> list[dict]:
        return await asyncio.to_thread(
            lambda: list(self._run("query", sql, parameters=parameters).named_results())
        )

    async def insert(
        self,
        table: str,
        rows: Sequence[Sequence[Any]],
        column_names: Sequence[str],
        settings: dict | None = None,
    ) -> None:
        await asyncio.to_thread(
            self._run, "insert", table, rows, column_names=list(column_names), settings=settings
        )

    async def insert_retrying(
        self,
        table: str,
        rows: Sequence[Sequence[Any]],
        column_names: Sequence[str],
        *,
        give_up_after: float,
        settings: dict | None = None,
    ) -> None:
        """``insert`` with backoff (0.2 s doubling to 5 s) while it fails; raises the last error
        once ``give_up_after`` seconds would pass. Give ``settings`` an
        ``insert_deduplication_token`` so a retry that did land once is not stored twice."""
        delay, deadline = 0.2, time.monotonic() + give_up_after
        while True:
            try:
                await self.insert(table, rows, column_names, settings)
                return
            except Exception as exc:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("ClickHouse insert into %s failed (%s); retrying in %.1fs", table, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def ping(self) -> bool:
        try:
            await self.command("SELECT 1")
            return True
        except Exception:
            return False

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
