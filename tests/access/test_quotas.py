"""Rate limiters: in-process and Redis-shared sliding windows."""

from __future__ import annotations

import os
import secrets
import socket

import pytest

from airlock.access.quotas import MemoryRateLimiter, RateLimiter, RedisRateLimiter
from airlock.errors import RateLimitError


def _redis_reachable() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=1):
            return True
    except OSError:
        return False


def _limiters() -> list[RateLimiter]:
    limiters: list[RateLimiter] = [MemoryRateLimiter(window_s=60)]
    if _redis_reachable():
        limiters.append(RedisRateLimiter("redis://127.0.0.1:6379/0", prefix=f"airlock-test:{secrets.token_hex(4)}:"))
    elif os.environ.get("CI"):
        pytest.fail("Redis must be reachable in CI (127.0.0.1:6379)")
    return limiters


@pytest.mark.parametrize("limiter", _limiters(), ids=lambda lim: type(lim).__name__)
async def test_limit_per_grant(limiter: RateLimiter) -> None:
    for _ in range(3):
        await limiter.hit("grant_a", 3)
    with pytest.raises(RateLimitError) as info:
        await limiter.hit("grant_a", 3)
    assert info.value.retry_after is not None and 0 < info.value.retry_after <= 60
    await limiter.hit("grant_b", 3)  # other grants are counted separately
    await limiter.aclose()


async def test_redis_window_is_shared_between_replicas() -> None:
    if not _redis_reachable():
        pytest.skip("Redis is not reachable at 127.0.0.1:6379")
    prefix = f"airlock-test:{secrets.token_hex(4)}:"
    a = RedisRateLimiter("redis://127.0.0.1:6379/0", prefix=prefix)
    b = RedisRateLimiter("redis://127.0.0.1:6379/0", prefix=prefix)
    await a.hit("g", 2)
    await b.hit("g", 2)
    with pytest.raises(RateLimitError):
        await a.hit("g", 2)
    await a.aclose()
    await b.aclose()


async def test_redis_limiter_counts_concurrent_hits_exactly() -> None:
    """Many requests at once through two limiters: exactly the limit passes."""
    import asyncio

    if not _redis_reachable():
        pytest.skip("Redis is not reachable at 127.0.0.1:6379")
    prefix = f"airlock-test:{secrets.token_hex(4)}:"
    a = RedisRateLimiter("redis://127.0.0.1:6379/0", prefix=prefix)
    b = RedisRateLimiter("redis://127.0.0.1:6379/0", prefix=prefix)

    async def attempt(limiter: RedisRateLimiter) -> bool:
        try:
            await limiter.hit("g", 25)
        except RateLimitError:
            return False
        return True

    outcomes = await asyncio.gather(*(attempt(a if i % 2 else b) for i in range(80)))
    assert sum(outcomes) == 25
    await a.aclose()
    await b.aclose()


async def test_memory_window_slides() -> None:
    limiter = MemoryRateLimiter(window_s=0.05)
    await limiter.hit("g", 1)
    with pytest.raises(RateLimitError):
        await limiter.hit("g", 1)
    import time

    time.sleep(0.06)
    await limiter.hit("g", 1)


async def test_redis_limiter_reloads_a_flushed_script_and_reconnects() -> None:
    """A Redis that forgot the script (restart, SCRIPT FLUSH) or dropped the connection still counts every hit."""
    import asyncio

    import redis.asyncio

    if not _redis_reachable():
        pytest.skip("Redis is not reachable at 127.0.0.1:6379")
    prefix = f"airlock-test:{secrets.token_hex(4)}:"
    limiter = RedisRateLimiter("redis://127.0.0.1:6379/0", prefix=prefix)
    admin = redis.asyncio.Redis.from_url("redis://127.0.0.1:6379/0")
    try:
        await limiter.hit("g", 4)
        await admin.script_flush()
        await limiter.hit("g", 4)  # NOSCRIPT: sent again with the script itself
        client_id = await limiter._ready().call("CLIENT", "ID")
        await admin.client_kill_filter(_id=str(client_id))
        for _ in range(100):  # the reader sees the connection end
            if limiter._ready()._conn is None:
                break
            await asyncio.sleep(0.01)
        await limiter.hit("g", 4)  # connects again
        assert await admin.zcard(prefix + "g") == 3  # each hit counted once
        with pytest.raises(RateLimitError):
            await limiter.hit("g", 3)
    finally:
        await limiter.aclose()
        await admin.aclose()
