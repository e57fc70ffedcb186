"""The per-project response cache: Redis when configured, else in-process; 7-day TTL by default."""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from typing import Any, Protocol

import orjson

KEY_FIELDS = (
    "model",
    "messages",
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "response_format",
    "max_tokens",
)


def cache_key(project_id: str, request: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of the fields that decide the answer (temperature is not one)."""
    canonical = orjson.dumps({f: request.get(f) for f in KEY_FIELDS}, option=orjson.OPT_SORT_KEYS)
    return f"distillery:cache:{project_id}:{hashlib.sha256(canonical).hexdigest()}"


class ResponseCache(Protocol):
    async def get(self, key: str) -> dict[str, Any] | None: ...
    async def set(self, key: str, completion: dict[str, Any]) -> None: ...
    async def close(self) -> None: ...


class MemoryCache:
    """Bounded LRU with expiry, for a single process."""

    def __init__(self, ttl_seconds: int, max_entries: int) -> None:
        self.ttl = ttl_seconds
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    async def get(self, key: str) -> dict[str, Any] | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, value = entry
        if expires < time.monotonic():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return orjson.loads(value)

    async def set(self, key: str, completion: dict[str, Any]) -> None:
        self._entries[key] = (time.monotonic() + self.ttl, orjson.dumps(completion))
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    async def close(self) -> None:
        self._entries.clear()


class RedisCache:
    def __init__(self, url: str, ttl_seconds: int) -> None:
        import redis.asyncio as redis

        self.ttl = ttl_seconds
        self._redis = redis.from_url(url)

    async def get(self, key: str) -> dict[str, Any] | None:
        value = await self._redis.get(key)
        return orjson.loads(value) if value else None

    async def set(self, key: str, completion: dict[str, Any]) -> None:
        await self._redis.set(key, orjson.dumps(completion), ex=self.ttl)

    async def close(self) -> None:
        await self._redis.aclose()


def make_cache(redis_url: str, ttl_seconds: int, max_entries: int) -> ResponseCache:
    return RedisCache(redis_url, ttl_seconds) if redis_url else MemoryCache(ttl_seconds, max_entries)
