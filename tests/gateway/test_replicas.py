"""Two `airlock serve` replicas on one PostgreSQL and one Redis behave as one gateway.

32 clients spread over both replicas hammer a grant with a requests/min quota: exactly the quota
passes, every other request is a 429, nothing else; every request has its audit row; the ledger
(sequenced by both replicas in turn) verifies, audit digests included.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from sqlalchemy import func, select

from tests.conftest import KEY_ENV, PG_AVAILABLE, REPO, UPSTREAM_KEY, UPSTREAM_MODEL, _pg_database, grant_request

pytestmark = [pytest.mark.postgres, pytest.mark.replicas]

QUOTA = 120
CLIENTS = 32
DURATION_S = 20.0
REDIS_URL = "redis://127.0.0.1:6379/0"


def _redis_reachable() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture
def pg_url() -> Iterator[str]:
    if not PG_AVAILABLE or not _redis_reachable():
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL and Redis must be reachable in CI")
        pytest.skip("needs PostgreSQL at 127.0.0.1:5432 and Redis at 127.0.0.1:6379")
    yield from _pg_database()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"replica exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"{url} did not become healthy")


async def _hammer(urls: list[str], key: str) -> Counter[int]:
    body = {"model": "frontier/helpful-only", "messages": [{"role": "user", "content": "abc"}], "max_tokens": 4}
    statuses: Counter[int] = Counter()
    stop_at = time.monotonic() + DURATION_S
    headers = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=60)) as http:

        async def client(url: str) -> None:
            while time.monotonic() < stop_at:
                async with http.post(url + "/v1/chat/completions", json=body) as resp:
                    await resp.read()
                    statuses[resp.status] += 1

        await asyncio.gather(*(client(urls[i % len(urls)]) for i in range(CLIENTS)))
    return statuses


def test_two_replicas_enforce_one_quota_and_keep_one_record(
    pg_url: str, upstream: str, tmp_path: Path, airlock_env: Path
) -> None:
    from airlock.access import service
    from airlock.access.audit import AUDIT_DIGEST
    from airlock.access.models import AuditEvent
    from airlock.access.seal import prepare_grant_seals
    from airlock.config import get_settings
    from airlock.db import Database
    from airlock.ledger.service import check_database, digest_audit, get_signer, publish_checkpoint
    from airlock.registry.service import parse_manifest, sync_manifest

    config = {"base_url": upstream + "/v1", "model": UPSTREAM_MODEL, "api_key_env": KEY_ENV}
    manifest = {
        "models": [
            {
                "name": "frontier",
                "versions": [
                    {
                        "label": "rc1",
                        "content_hash": "7" * 64,
                        "variants": [{"name": "helpful-only", "backend": "openai_upstream", "backend_config": config}],
                    }
                ],
            }
        ]
    }
    db = Database(pg_url)
    db.migrate()
    settings = get_settings()
    prepare_grant_seals(db, settings)
    with db.session() as session:
        sync_manifest(session, parse_manifest(manifest))
        service.create_evaluator(session, "org-a")
        grant = service.create_grant(
            session,
            grant_request(
                evaluator="org-a",
                model="frontier",
                variants=["helpful-only"],
                scopes=["sample"],
                quota_requests_per_minute=QUOTA,
            ),
        )
        _key, token = service.create_api_key(session, grant.id)
        grant_id = grant.id

    env = {
        **os.environ,
        "AIRLOCK_HOME": str(airlock_env),
        "AIRLOCK_DATABASE_URL": pg_url,
        "AIRLOCK_REDIS_URL": REDIS_URL,
        KEY_ENV: UPSTREAM_KEY,
        "PYTHONPATH": str(REPO / "src"),
        # Digest quickly, so the ledger covers the audit rows this test writes.
        "AIRLOCK_LEDGER_CHECKPOINT_INTERVAL_S": "2",
    }
    replicas: list[tuple[str, subprocess.Popen[bytes]]] = []
    try:
        for _ in range(2):
            port = _free_port()
            cmd = [sys.executable, "-m", "airlock", "serve", "--port", str(port), "--log-level", "warning"]
            replicas.append((f"http://127.0.0.1:{port}", subprocess.Popen(cmd, env=env, cwd=tmp_path)))
        for url, proc in replicas:
            _wait_healthy(url, proc)
        statuses = asyncio.run(_hammer([url for url, _ in replicas], token))
    finally:
        for _url, proc in replicas:
            proc.terminate()  # a clean shutdown writes every queued audit event
        for _url, proc in replicas:
            proc.wait(timeout=60)

    assert statuses[200] == QUOTA, statuses
    assert set(statuses) <= {200, 429}, statuses
    total = sum(statuses.values())
    assert total > QUOTA
    with db.session() as session:
        rows = session.scalar(select(func.count()).select_from(AuditEvent).where(AuditEvent.grant_id == grant_id))
        by_status = dict(
            session.execute(
                select(AuditEvent.status_code, func.count())
                .where(AuditEvent.grant_id == grant_id)
                .group_by(AuditEvent.status_code)
            ).all()
        )
    assert rows == total
    assert by_status == dict(statuses)
    digest_audit(db, AUDIT_DIGEST, lag_s=0)
    publish_checkpoint(db, get_signer(settings))
    assert check_database(db, get_signer(settings), audit=AUDIT_DIGEST) == []
    db.dispose()
