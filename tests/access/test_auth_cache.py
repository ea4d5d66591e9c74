"""The authentication cache: a warm key reads no database, and every revocation empties it in every process."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from airlock.access import service
from airlock.config import reset_settings
from airlock.db import Database
from tests.conftest import HTTP_TIMEOUT, Lab

CHAT = {"model": "m1/helpful-only", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def long_cache(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Cache entries that would outlive any test: only an invalidation can end them."""
    monkeypatch.setenv("AIRLOCK_AUTH_CACHE_TTL_S", "3600")
    reset_settings()
    yield


def _chat(http: httpx.Client, key: str) -> httpx.Response:
    return http.post("/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {key}"})


def _key_id(db: Database, grant_id: str) -> str:
    with db.session() as session:
        (key,) = service.get_grant(session, grant_id).keys
        return key.id


def _wait_for_status(http: httpx.Client, key: str, status: int, timeout: float = 30.0) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        resp = _chat(http, key)
        if resp.status_code == status or time.monotonic() > deadline:
            return resp
        time.sleep(0.01)


def test_revocation_through_the_api_ends_a_cached_key_at_once(long_cache: None, lab: Lab) -> None:
    grant_id, key = lab.grant("org-a")
    auth = lab.server.app.state.gateway.auth
    with httpx.Client(base_url=lab.url, timeout=HTTP_TIMEOUT) as http:
        assert _chat(http, key).status_code == 200
        assert auth.lookup(key) is not None  # served from the cache from now on
        admin = {"Authorization": f"Bearer {lab.admin_token}"}
        revoked = http.post(f"/v1/airlock/admin/keys/{_key_id(lab.db, grant_id)}/revoke", headers=admin)
        assert revoked.status_code == 200, revoked.text
        resp = _chat(http, key)  # no waiting: the revoking request emptied the cache before it answered
    assert resp.status_code == 401
    assert resp.json()["error"]["code"] == "key_revoked"


def test_revocation_by_another_process_ends_a_cached_grant(long_cache: None, lab: Lab) -> None:
    grant_id, key = lab.grant("org-a")
    auth = lab.server.app.state.gateway.auth
    with httpx.Client(base_url=lab.url, timeout=HTTP_TIMEOUT) as http:
        assert _chat(http, key).status_code == 200
        assert auth.lookup(key) is not None
        # Another engine on the same database stands for another process or replica (the CLI, say):
        # its commit reaches the gateway only through the database's signal (NOTIFY, or the SQLite file).
        other = Database(lab.db.url)
        try:
            with other.session() as session:
                service.revoke_grant(session, grant_id, "ended early")
        finally:
            other.dispose()
        resp = _wait_for_status(http, key, 401)
    assert resp.status_code == 401
    assert resp.json()["error"]["code"] == "grant_revoked"
    assert auth.lookup(key) is None


def test_a_fill_that_raced_an_invalidation_is_not_kept() -> None:
    from airlock.access.cache import AuthCache

    cache = AuthCache(ttl_s=60)
    started_in = cache.generation
    cache.invalidate()  # a revocation committed while the lookup was reading the database
    cache.put("digest", object(), started_in)  # type: ignore[arg-type]
    assert cache.get("digest") is None
    cache.put("digest", object(), cache.generation)  # type: ignore[arg-type]
    assert cache.get("digest") is not None
