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
    reads each reply through a stream reader and a task, which costs more CPU than the round trip
    itself. Here a command is packed and written at once (hiredis packs it; no waiting for earlier
    answers) and the socket's data goes straight into hiredis's reply parser, which hands each
    reply, in order, to the request that sent it. The connection is opened by redis-py (address,
    credentials, database, TLS: everything the URL says), then its transport is handed to
    :class:`_Replies`. A broken connection fails the commands waiting on it, as the pooled client
    did; the next command connects again.
    """

    def __init__(self, url: str) -> None:
        import redis.asyncio  # only where a Redis limiter is configured

        self._pool: Any = redis.asyncio.ConnectionPool.from_url(url)
        self._conn: Any = None
        self._replies: _Replies | None = None
        self._connecting = asyncio.Lock()

    async def _connection(self) -> _Replies:
        if self._replies is not None and not self._replies.broken:
            return self._replies
        async with self._connecting:
            if self._replies is None or self._replies.broken:
                conn = self._pool.make_connection()
                await conn.connect()  # redis-py's handshake: AUTH, SELECT, TLS
                # The handshake is over and nothing else was sent: from now on replies come to _Replies.
                transport = conn._writer.transport
                replies = _Replies(transport)
                transport.set_protocol(replies)
                self._conn, self._replies = conn, replies
        return self._replies

    async def call(self, *args: Any) -> Any:
        """Send one command and return its reply (a Redis error reply is raised as ``ResponseError``)."""
        replies = self._replies
        if replies is None or replies.broken:
            replies = await self._connection()
        return await replies.send(args)

    async def aclose(self) -> None:
        """Close the connection."""
        replies, self._replies = self._replies, None
        conn, self._conn = self._conn, None
        if replies is not None:
            replies.fail(RedisConnectionError("the rate limiter was closed"))
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.disconnect()
        await self._pool.disconnect()


class _Replies(asyncio.Protocol):
    """Receives a Redis connection's replies and resolves the commands' futures in the order they were sent."""

    def __init__(self, transport: Any) -> None:
        import hiredis

        self._transport = transport
        self._reader = hiredis.Reader(replyError=ResponseError)
        self._pack = hiredis.pack_command
        self._pending: deque[asyncio.Future[Any]] = deque()
        self.broken = False

    def send(self, args: tuple[Any, ...]) -> asyncio.Future[Any]:
        """Write one command; its reply resolves the future returned."""
        if self.broken:
            raise RedisConnectionError("the Redis connection is closed")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        # Queued and written with no await between: replies arrive in the order sent.
        self._pending.append(future)
        self._transport.write(self._pack(args))
        return future

    def data_received(self, data: bytes) -> None:
        """Parse replies; each answers the oldest command waiting."""
        self._reader.feed(data)
        while True:
            try:
                reply = self._reader.gets()
            except Exception as exc:  # not the Redis protocol: nothing more on this connection can be trusted
                self.fail(RedisConnectionError(f"invalid reply from Redis: {exc}"))
                return
            if reply is False:
                return
            if not self._pending:
                continue
            future = self._pending.popleft()
            if future.done():
                continue
            if isinstance(reply, ResponseError):
                message = str(reply)
                # An error reply answers its own command only; NOSCRIPT is its own class, as redis-py raises it.
                future.set_exception(NoScriptError(message) if message.startswith("NOSCRIPT") else reply)
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        """Fail the commands still waiting."""
        self.fail(
            RedisConnectionError(f"the Redis connection was lost: {exc}" if exc else "Redis closed the connection")
        )

    def fail(self, exc: Exception) -> None:
        """Mark the connection broken, fail every waiting command and close the socket."""
        self.broken = True
        pending, self._pending = self._pending, deque()
        for future in pending:
            if not future.done():
                future.set_exception(exc)
        self._transport.close()


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
