"""Sampling terms and their enforcement: requests per minute (in-process or Redis) and total tokens (database)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import math
import os
import threading
import time
from collections import defaultdict, deque
from typing import Any, ClassVar, Protocol

from pydantic import Field, PositiveInt
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
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
        self._sha = hashlib.sha1(self._SCRIPT.encode()).hexdigest()
        self._pipe: _Pipeline | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _ready(self) -> _Pipeline:
        # Redis connections belong to the event loop that opened them.
        loop = asyncio.get_running_loop()
        if self._pipe is None or self._loop is not loop:
            self._pipe = _Pipeline(self._url)
            self._loop = loop
        return self._pipe

    async def hit(self, grant_id: str, limit: int) -> None:
        """Count one request for ``grant_id`` atomically in Redis, without blocking the event loop."""
        pipe = self._ready()
        now = time.time()
        member = f"{now:.6f}:{self._tag}:{next(self._counter)}"
        args = (1, self._prefix + grant_id, now, self._window, limit, member)
        try:
            reply = await pipe.call("EVALSHA", self._sha, *args)
        except NoScriptError:  # a restarted or flushed Redis: the script text loads it again
            reply = await pipe.call("EVAL", self._SCRIPT, *args)  # loads the script for the next EVALSHA
        ok, oldest = reply
        if not int(ok):
            retry = float(oldest) + self._window - now if oldest else self._window
            raise RateLimitError(
                f"rate limit of {limit} requests/min reached for your grant; retry in {math.ceil(retry)}s",
                retry_after=retry,
            )

    async def aclose(self) -> None:
        """Close the Redis connection of this loop."""
        pipe, self._pipe = self._pipe, None
        if pipe is not None and self._loop is asyncio.get_running_loop():
            await pipe.aclose()


class _Pipeline:
    """One Redis connection shared by all of a loop's requests, commands pipelined and answered in order.

    redis-py's pooled client checks a connection out, wraps the call in its retry machinery and
    checks it back in for every command, which costs more CPU than the round trip itself. Here a
    command is written at once (no waiting for earlier answers) and one reader task hands each
    reply, in order, to the request that sent it. The connection (address, credentials, database,
    TLS and the reply parser) is redis-py's own. A broken connection fails the commands waiting on
    it, as the pooled client did; the next command connects again.
    """

    def __init__(self, url: str) -> None:
        import redis.asyncio  # only where a Redis limiter is configured

        self._pool: Any = redis.asyncio.ConnectionPool.from_url(url)
        self._conn: Any = None
        self._pending: deque[asyncio.Future[Any]] = deque()
        self._reader: asyncio.Task[None] | None = None
        self._connecting = asyncio.Lock()

    async def _connection(self) -> Any:
        if self._conn is not None:
            return self._conn
        async with self._connecting:
            if self._conn is None:
                conn = self._pool.make_connection()
                await conn.connect()
                self._conn = conn
                self._reader = asyncio.get_running_loop().create_task(self._read(conn))
        return self._conn

    async def call(self, *args: Any) -> Any:
        """Send one command and return its reply (a Redis error reply is raised as ``ResponseError``)."""
        conn = await self._connection()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        # Queued before the write and written before any await: replies arrive in the order sent.
        self._pending.append(future)
        try:
            await conn.send_packed_command(conn.pack_command(*args), check_health=False)
        except BaseException:
            self._broken(conn, RedisConnectionError("writing to Redis failed"))
            raise
        return await future

    async def _read(self, conn: Any) -> None:
        while True:
            try:
                reply = await conn.read_response(timeout=math.inf)
            except ResponseError as exc:  # an error reply answers its own command only
                if self._pending:
                    future = self._pending.popleft()
                    if not future.done():
                        future.set_exception(exc)
                continue
            except BaseException as exc:
                self._broken(conn, exc if isinstance(exc, Exception) else RedisConnectionError(str(exc)))
                return
            if self._pending:
                future = self._pending.popleft()
                if not future.done():
                    future.set_result(reply)

    def _broken(self, conn: Any, exc: Exception) -> None:
        if self._conn is not conn:
            return
        self._conn = None
        pending, self._pending = self._pending, deque()
        for future in pending:
            if not future.done():
                future.set_exception(exc)
        reader, self._reader = self._reader, None
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
        asyncio.get_running_loop().create_task(conn.disconnect(nowait=True))

    async def aclose(self) -> None:
        """Close the connection and stop the reader."""
        conn, self._conn = self._conn, None
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
        for future in self._pending:
            if not future.done():
                future.set_exception(RedisConnectionError("the rate limiter was closed"))
        self._pending.clear()
        if conn is not None:
            await conn.disconnect()
        await self._pool.disconnect()


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
