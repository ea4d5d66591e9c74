"""Sampling terms and their enforcement: requests per minute (in-process or Redis) and total tokens (database)."""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import threading
import time
from collections import defaultdict, deque
from typing import Any, ClassVar, Protocol

from pydantic import Field, PositiveInt
from sqlalchemy import select
from sqlalchemy.orm import Session

from airlock.access.models import Grant
from airlock.access.terms import Terms, register_terms, terms_of
from airlock.errors import RateLimitError


@register_terms
class SamplingTerms(Terms):
    """What a grant may sample: its request rate and token budget, and whether its samples are watermarked."""

    section: ClassVar[str] = "sampling"
    public_terms: ClassVar[tuple[str, ...]] = ("watermark",)
    ledger_quota_names: ClassVar[dict[str, str]] = {
        "quota_requests_per_minute": "requests_per_minute",
        "quota_total_tokens": "total_tokens",
    }

    quota_requests_per_minute: PositiveInt | None = Field(default=None, description="Requests per minute.")
    quota_total_tokens: PositiveInt | None = Field(default=None, description="Prompt and completion tokens in all.")
    watermark: bool = Field(
        default=True,
        description="Tokens sampled at temperature > 0 where Airlock holds the logits carry the grant's "
        "leak-attribution watermark.",
    )


class RateLimiter(Protocol):
    """Counts requests per grant in a sliding 60-second window."""

    async def hit(self, grant_id: str, limit: int) -> None:
        """Count one request, raising RateLimitError when ``limit`` per minute is exceeded."""

    async def aclose(self) -> None:
        """Release connections (a no-op for the in-process limiter)."""


class MemoryRateLimiter:
    """Sliding-window limiter for a single gateway process (the embedded default)."""

    def __init__(self, window_s: float = 60.0) -> None:
        self._window = window_s
        self._hits: dict[str, deque[float]] = defaultdict(deque)
        self._lock = threading.Lock()

    async def hit(self, grant_id: str, limit: int) -> None:
        """Count one request for ``grant_id``; raise when over ``limit`` in the window."""
        self.hit_sync(grant_id, limit)

    async def aclose(self) -> None:
        """Nothing to release."""

    def hit_sync(self, grant_id: str, limit: int) -> None:
        """Count one request for ``grant_id`` from any thread; raise when over ``limit`` in the window."""
        now = time.monotonic()
        with self._lock:
            hits = self._hits[grant_id]
            while hits and hits[0] <= now - self._window:
                hits.popleft()
            if len(hits) >= limit:
                retry = hits[0] + self._window - now
                raise RateLimitError(
                    f"rate limit of {limit} requests/min reached for your grant; retry in {math.ceil(retry)}s",
                    retry_after=retry,
                )
            hits.append(now)


class RedisRateLimiter:
    """Sliding-window limiter shared by several gateway replicas through Redis sorted sets."""

    _SCRIPT = """
    local key, now, window, limit, member = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
    local count = redis.call('ZCARD', key)
    if count >= limit then
      local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
      return {0, tostring(oldest[2])}
    end
    redis.call('ZADD', key, now, member)
    redis.call('PEXPIRE', key, math.ceil(window * 1000))
    return {1, ''}
    """

    def __init__(self, url: str, window_s: float = 60.0, prefix: str = "airlock:rpm:") -> None:
        self._url = url
        self._window = window_s
        self._prefix = prefix
        # Unique sorted-set members without a clock race: this process's random tag and a counter.
        self._tag = os.urandom(6).hex()
        self._counter = itertools.count()
        self._client: Any = None
        self._script: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _ready(self) -> Any:
        # redis.asyncio connections belong to the event loop that opened them.
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            import redis.asyncio

            self._client = redis.asyncio.Redis.from_url(self._url)
            self._script = self._client.register_script(self._SCRIPT)
            self._loop = loop
        return self._script

    async def hit(self, grant_id: str, limit: int) -> None:
        """Count one request for ``grant_id`` atomically in Redis, without blocking the event loop."""
        script = self._ready()
        now = time.time()
        member = f"{now:.6f}:{self._tag}:{next(self._counter)}"
        ok, oldest = await script(keys=[self._prefix + grant_id], args=[now, self._window, limit, member])
        if not int(ok):
            retry = float(oldest) + self._window - now if oldest else self._window
            raise RateLimitError(
                f"rate limit of {limit} requests/min reached for your grant; retry in {math.ceil(retry)}s",
                retry_after=retry,
            )

    async def aclose(self) -> None:
        """Close the Redis connections of this loop."""
        client, self._client = self._client, None
        if client is not None and self._loop is asyncio.get_running_loop():
            await client.aclose()


def tokens_used(session: Session, grant_id: str) -> int:
    """Return the tokens a grant has used so far, as the audit writer has charged them."""
    return int(session.scalar(select(Grant.tokens_used).where(Grant.id == grant_id)) or 0)


def check_token_quota(grant: Grant, used: int | None = None) -> None:
    """Raise RateLimitError when the grant has used its total-token quota (``used``: a fresh count)."""
    used = grant.tokens_used if used is None else used
    quota = terms_of(grant, SamplingTerms).quota_total_tokens
    if quota is not None and used >= quota:
        raise RateLimitError(
            f"your grant's quota of {quota} tokens is used up",
            code="insufficient_quota",
        )


def make_rate_limiter(redis_url: str | None) -> RateLimiter:
    """Return a Redis-backed limiter when ``redis_url`` is set, else an in-process one."""
    return RedisRateLimiter(redis_url) if redis_url else MemoryRateLimiter()
