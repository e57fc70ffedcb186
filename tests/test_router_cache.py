"""The response cache: key rules, in-process LRU with expiry, and Redis (the real server on :6379)."""

from __future__ import annotations

import asyncio
import secrets

import pytest
import redis.asyncio as redis

from services.router.cache import MemoryCache, RedisCache, cache_key, make_cache
from tests.helpers import MESSAGES

REQUEST = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
COMPLETION = {"id": "chatcmpl-1", "object": "chat.completion", "choices": []}


def test_cache_key_rules() -> None:
    key = cache_key("p1", REQUEST)
    assert key == cache_key("p1", {**REQUEST, "temperature": 1.7, "stream": True, "metadata": {"a": "b"}})
    assert key == cache_key("p1", dict(reversed(list(REQUEST.items()))))  # canonical JSON
    assert key != cache_key("p2", REQUEST)  # per project
    for field, value in [
        ("model", "gpt-4o"),
        ("max_tokens", 11),
        ("tools", [{"type": "function"}]),
        ("response_format", {"type": "json_object"}),
        ("tool_choice", "required"),
    ]:
        assert key != cache_key("p1", {**REQUEST, field: value}), field


async def test_memory_cache_expires_and_evicts() -> None:
    cache = MemoryCache(ttl_seconds=1, max_entries=2)
    await cache.set("a", COMPLETION)
    await cache.set("b", COMPLETION)
    assert await cache.get("a") == COMPLETION  # "a" is now the most recent
    await cache.set("c", COMPLETION)
    assert await cache.get("b") is None and await cache.get("a") is not None
    cache.ttl = 0
    await cache.set("d", COMPLETION)
    await asyncio.sleep(0.01)
    assert await cache.get("d") is None


async def test_redis_cache_round_trip_with_ttl() -> None:
    url = "redis://127.0.0.1:6379/0"
    cache = make_cache(url, ttl_seconds=7 * 24 * 3600, max_entries=10)
    assert isinstance(cache, RedisCache)
    key = cache_key(f"test-{secrets.token_hex(4)}", REQUEST)
    try:
        assert await cache.get(key) is None
        await cache.set(key, COMPLETION)
        assert await cache.get(key) == COMPLETION
        client = redis.from_url(url)
        ttl = await client.ttl(key)
        assert 7 * 24 * 3600 - 5 < ttl <= 7 * 24 * 3600
        await client.delete(key)
        await client.aclose()
    finally:
        await cache.close()


async def test_redis_down_is_a_clear_error() -> None:
    cache = RedisCache("redis://127.0.0.1:1/0", ttl_seconds=10)
    with pytest.raises(redis.ConnectionError):
        await cache.get("k")
    await cache.close()


async def test_router_answers_when_the_cache_is_down(ready, running) -> None:  # noqa: F811
    """Redis going away mid-run costs the cache, never the call."""
    import openai

    chat = running.platform.state["chat"]
    healthy = chat.cache
    chat.cache = RedisCache("redis://127.0.0.1:1/0", ttl_seconds=10)
    try:
        client = openai.AsyncOpenAI(api_key=ready.key, base_url=ready.base_url, max_retries=0)
        completion = await client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, extra_headers={"op-cache": "readWrite"}
        )
        assert completion.choices[0].message.content == "Answer to: Count to 3"
    finally:
        await chat.cache.close()
        chat.cache = healthy
