"""Start real gateways for benchmarks: a data dir, a database, a grant, and ``airlock serve`` processes."""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import free_port, wait_http

REPO = Path(__file__).resolve().parents[1]
PG_ADMIN_URL = os.environ.get("AIRLOCK_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("AIRLOCK_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
MODEL = "bench/helpful-only"


@contextlib.contextmanager
def instant_upstream() -> Iterator[tuple[str, int]]:
    """Run bench/instant_upstream.py in its own process; yield its ``/v1`` URL and pid."""
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "bench" / "instant_upstream.py")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("PORT "):
            raise RuntimeError(f"the instant upstream did not start: {line!r}")
        yield f"http://127.0.0.1:{int(line.split()[1])}/v1", proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@contextlib.contextmanager
def database(kind: str, directory: Path) -> Iterator[str]:
    """Yield a fresh database URL: ``sqlite`` in ``directory`` or a new ``postgresql`` database (dropped after)."""
    if kind == "sqlite":
        yield f"sqlite:///{directory / 'airlock.db'}"
        return
    import psycopg

    name = f"airlock_bench_{secrets.token_hex(5)}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass
class Lab:
    """A prepared data dir and database with a grant on an upstream-served variant."""

    home: Path
    db_url: str
    redis_url: str | None
    key: str
    grant_id: str
    env: dict[str, str] = field(default_factory=dict)


def _make_lab(
    home: Path,
    db_url: str,
    model: dict[str, Any],
    *,
    variant: str,
    scopes: list[str],
    redis_url: str | None = None,
    requests_per_minute: int | None = None,
    extra_env: dict[str, str] | None = None,
) -> Lab:
    """Migrate ``db_url``, register ``model`` (a manifest entry) and issue one grant on ``variant`` and its key."""
    sys.path.insert(0, str(REPO / "src"))
    from airlock.access import service
    from airlock.access.seal import prepare_grant_seals
    from airlock.config import Settings
    from airlock.db import Database
    from airlock.registry.service import parse_manifest, sync_manifest

    home.mkdir(parents=True, exist_ok=True)
    env = {
        "AIRLOCK_HOME": str(home),
        "AIRLOCK_DATABASE_URL": db_url,
        "PYTHONPATH": str(REPO / "src"),
        **(extra_env or {}),
    }
    if redis_url:
        env["AIRLOCK_REDIS_URL"] = redis_url
    settings = Settings(home=home, database_url=db_url, redis_url=redis_url)
    db = Database(db_url)
    db.migrate()
    prepare_grant_seals(db, settings)
    with db.session() as session:
        sync_manifest(session, parse_manifest({"models": [model]}))
        service.create_evaluator(session, "bench-org")
        grant = service.create_grant(
            session,
            service.GrantRequest(
                evaluator="bench-org",
                model=model["name"],
                variants=[variant],
                scopes=scopes,
                terms={"quota_requests_per_minute": requests_per_minute} if requests_per_minute else {},
            ),
        )
        _key, token = service.create_api_key(session, grant.id)
        grant_id = grant.id
    db.dispose()
    return Lab(home=home, db_url=db_url, redis_url=redis_url, key=token, grant_id=grant_id, env=env)


def prepare_lab(
    home: Path,
    db_url: str,
    upstream_url: str,
    *,
    redis_url: str | None = None,
    requests_per_minute: int | None = None,
    extra_env: dict[str, str] | None = None,
) -> Lab:
    """Migrate ``db_url``, register a variant served by ``upstream_url`` and issue one grant and key."""
    model = {
        "name": "bench",
        "versions": [
            {
                "label": "v1",
                "content_hash": "0" * 64,
                "variants": [
                    {
                        "name": "helpful-only",
                        "backend": "openai_upstream",
                        "backend_config": {"base_url": upstream_url, "model": "instant"},
                    }
                ],
            }
        ],
    }
    return _make_lab(
        home,
        db_url,
        model,
        variant="helpful-only",
        scopes=["sample"],
        redis_url=redis_url,
        requests_per_minute=requests_per_minute,
        extra_env=extra_env,
    )


LOCAL_MODEL = "tiny/helpful-only"


def prepare_local_lab(
    home: Path,
    db_url: str,
    *,
    weights: str = "tiny-random",
    scopes: tuple[str, ...] = ("interp",),
    backend_config: dict[str, Any] | None = None,
) -> Lab:
    """Migrate ``db_url``, register ``tiny/helpful-only`` served from local ``weights``, issue one grant and key."""
    variant: dict[str, Any] = {"name": "helpful-only"}
    if backend_config:
        variant["backend_config"] = backend_config
    model = {"name": "tiny", "versions": [{"label": "v1", "weights": weights, "variants": [variant]}]}
    return _make_lab(home, db_url, model, variant="helpful-only", scopes=list(scopes))


@contextlib.contextmanager
def serve(lab: Lab, *, workers: int = 1, args: tuple[str, ...] = ()) -> Iterator[tuple[str, int]]:
    """Run ``airlock serve`` on a free port; yield its root URL and pid (CPU is read from its process tree)."""
    port = free_port()
    env = {**os.environ, **lab.env}
    cmd = [sys.executable, "-m", "airlock", "serve", "--port", str(port), "--log-level", "warning"]
    if workers != 1:
        cmd += ["--workers", str(workers)]
    proc = subprocess.Popen([*cmd, *args], env=env, cwd=lab.home)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/healthz", timeout=180)
        yield url, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        time.sleep(0.2)
