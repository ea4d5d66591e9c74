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
def test_limit_per_grant(limiter: RateLimiter) -> None:
    for _ in range(3):
        limiter.hit("grant_a", 3)
    with pytest.raises(RateLimitError) as info:
        limiter.hit("grant_a", 3)
    assert info.value.retry_after is not None and 0 < info.value.retry_after <= 60
    limiter.hit("grant_b", 3)  # other grants are counted separately


def test_redis_window_is_shared_between_replicas() -> None:
    if not _redis_reachable():
        pytest.skip("Redis is not reachable at 127.0.0.1:6379")
    prefix = f"airlock-test:{secrets.token_hex(4)}:"
    a = RedisRateLimiter("redis://127.0.0.1:6379/0", prefix=prefix)
    b = RedisRateLimiter("redis://127.0.0.1:6379/0", prefix=prefix)
    a.hit("g", 2)
    b.hit("g", 2)
    with pytest.raises(RateLimitError):
        a.hit("g", 2)


def test_memory_window_slides() -> None:
    limiter = MemoryRateLimiter(window_s=0.05)
    limiter.hit("g", 1)
    with pytest.raises(RateLimitError):
        limiter.hit("g", 1)
    import time

    time.sleep(0.06)
    limiter.hit("g", 1)
