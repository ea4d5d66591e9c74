"""A short-lived, revocation-aware cache of authenticated evaluator keys, so a request reads no database.

Entries live ``ttl_s`` at most and are all dropped the moment any process commits a change that
can end or alter a key's access (a revoked key or grant: :data:`ACCESS_CHANNEL`, see
``airlock.signals``). A lookup that raced with such a change cannot store its stale answer: each
fill carries the generation it started in, and an invalidation moves the generation on.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

from sqlalchemy.orm import Session

from airlock.access.service import ACCESS_CHANNEL, Principal, access_changed, authenticate_key, hash_secret

__all__ = ["ACCESS_CHANNEL", "AuthCache", "access_changed"]


class AuthCache:
    """Maps a key's SHA-256 to its authenticated principal for up to ``ttl_s`` seconds (0 disables it)."""

    def __init__(self, ttl_s: float = 5.0, max_entries: int = 10_000) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[float, Principal]] = OrderedDict()
        self._lock = threading.Lock()
        self.generation = 0

    def get(self, digest: str) -> Principal | None:
        """Return the cached principal of a key digest, or None when absent or expired."""
        entry = self._entries.get(digest)
        if entry is None:
            return None
        expires, principal = entry
        if time.monotonic() >= expires:
            with self._lock:
                self._entries.pop(digest, None)
            return None
        return principal

    def put(self, digest: str, principal: Principal, generation: int) -> None:
        """Store a principal read during ``generation``; dropped if an invalidation came since."""
        if self.ttl_s <= 0:
            return
        with self._lock:
            if generation != self.generation:
                return
            self._entries[digest] = (time.monotonic() + self.ttl_s, principal)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def invalidate(self) -> None:
        """Forget every entry, and any fill still under way."""
        with self._lock:
            self.generation += 1
            self._entries.clear()

    def authenticate(self, session: Session, token: str | None) -> Principal:
        """Authenticate ``token`` against the database (as ``authenticate_key``) and cache the result."""
        generation = self.generation
        principal = authenticate_key(session, token)
        assert token is not None  # authenticate_key refused a missing key
        self.put(hash_secret(token), principal, generation)
        return principal

    def lookup(self, token: str | None) -> Principal | None:
        """Return the cached principal of ``token`` (None: ask the database)."""
        if not token or self.ttl_s <= 0:
            return None
        return self.get(hash_secret(token))
