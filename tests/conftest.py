"""Shared fixtures: isolated data dirs, both databases, a live HTTP server and a fake backend."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI

from airlock.config import reset_settings

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
PG_HOST, PG_PORT = "127.0.0.1", 5432
PG_ADMIN_URL = os.environ.get("AIRLOCK_TEST_PG_URL", f"postgresql://postgres@{PG_HOST}:{PG_PORT}/test")
# Test clients wait this long for a response. httpx's own 5 s default is a wall-clock race: a
# loaded CI host has stalled one plain request past it. A hung server still fails, by
# pytest-timeout's limit or by this one.
HTTP_TIMEOUT = 60.0


def _pg_reachable() -> bool:
    try:
        with socket.create_connection((PG_HOST, PG_PORT), timeout=1):
            return True
    except OSError:
        return False


PG_AVAILABLE = _pg_reachable()


def _bwrap_problem() -> str | None:
    from airlock.sandbox import BwrapSandbox, SandboxError

    try:
        result = BwrapSandbox().run_sync(["true"])
    except SandboxError as exc:
        return exc.message
    return None if result.ok else result.stderr_text


BWRAP_PROBLEM = _bwrap_problem()
if BWRAP_PROBLEM and os.environ.get("CI"):
    raise RuntimeError(f"bubblewrap must work in CI: {BWRAP_PROBLEM}")
needs_bwrap = pytest.mark.skipif(BWRAP_PROBLEM is not None, reason=f"bubblewrap cannot run here: {BWRAP_PROBLEM}")


def pytest_configure(config: pytest.Config) -> None:
    from tests.fakes import register_fake_backend

    register_fake_backend()


def pytest_report_header(config: pytest.Config) -> str:
    return f"PostgreSQL at {PG_HOST}:{PG_PORT}: {'reachable' if PG_AVAILABLE else 'NOT reachable (its tests skip)'}"


@pytest.fixture(autouse=True)
def airlock_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Give every test its own data dir; share the converted-model cache across runs."""
    home = tmp_path / "home"
    monkeypatch.setenv("AIRLOCK_HOME", str(home))
    monkeypatch.setenv("AIRLOCK_MODEL_CACHE", str(REPO / ".cache" / "models"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for var in ("AIRLOCK_DATABASE_URL", "AIRLOCK_MANIFEST", "AIRLOCK_REDIS_URL", "AIRLOCK_POLICY"):
        monkeypatch.delenv(var, raising=False)
    reset_settings()
    yield home
    reset_settings()


def _pg_database() -> Iterator[str]:
    import psycopg

    name = f"airlock_t_{secrets.token_hex(6)}"
    with psycopg.connect(PG_ADMIN_URL.replace("postgresql://", "postgresql://", 1), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database URL: SQLite, and PostgreSQL when reachable (always in CI)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'airlock.db'}"
        return
    if not PG_AVAILABLE:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL must be reachable in CI (127.0.0.1:5432)")
        pytest.skip("PostgreSQL is not reachable at 127.0.0.1:5432")
    yield from _pg_database()


@pytest.fixture
def db(db_url: str) -> Iterator[Any]:
    """A migrated Database on a fresh SQLite or PostgreSQL database."""
    from airlock.db import Database

    database = Database(db_url)
    database.migrate()
    yield database
    database.dispose()


class LiveServer:
    """Runs an ASGI app under uvicorn on a free loopback port in a background thread."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        from airlock.web.server import CoalescingHttpToolsProtocol

        # The protocol `airlock serve` runs.
        config = uvicorn.Config(
            app, host="127.0.0.1", port=0, log_level="warning", lifespan="on", http=CoalescingHttpToolsProtocol
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.port = 0

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the test server failed to start")
            if time.monotonic() > deadline:
                raise TimeoutError("the test server did not start in 120 s")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:41234``."""
        return f"http://127.0.0.1:{self.port}"

    def flush_audit(self) -> None:
        """Wait until every audit event so far is in the database."""
        self.app.state.gateway.audit.wait_idle()


FAKE_MANIFEST: dict[str, Any] = {
    "models": [
        {
            "name": "m1",
            "versions": [
                {
                    "label": "v1",
                    "stage": "external-candidate",
                    "content_hash": "a" * 64,
                    "variants": [
                        {
                            "name": "production",
                            "backend": "fake",
                            "mitigations": [
                                {
                                    "name": "safety-prompt",
                                    "kind": "system_prompt",
                                    "stance": "disabled_for_eval",
                                    "config": {"prompt": "be safe"},
                                },
                                {
                                    "name": "input-filter",
                                    "kind": "input_filter",
                                    "stance": "claimed",
                                    "config": {"patterns": ["zyloxin"], "classifier": "none"},
                                },
                                {
                                    "name": "output-filter",
                                    "kind": "output_filter",
                                    "stance": "claimed",
                                    "config": {"patterns": ["CANARY"], "classifier": "none"},
                                },
                            ],
                        },
                        {"name": "helpful-only", "backend": "fake"},
                        {"name": "base", "backend": "fake"},
                    ],
                }
            ],
        },
        {
            "name": "m2",
            "versions": [
                {"label": "v1", "content_hash": "b" * 64, "variants": [{"name": "production", "backend": "fake"}]}
            ],
        },
    ]
}


def grant_request(**kwargs: Any) -> Any:
    """Build a ``GrantRequest``; keywords that are no field of it are grant terms (``quota_total_tokens=5``)."""
    import dataclasses

    from airlock.access.service import GrantRequest

    fields = {f.name for f in dataclasses.fields(GrantRequest)}
    terms = {**kwargs.pop("terms", {}), **{k: kwargs.pop(k) for k in list(kwargs) if k not in fields}}
    return GrantRequest(**kwargs, terms=terms)


class Lab:
    """A running gateway over a fake-backend manifest, with helpers to issue grants and keys."""

    def __init__(self, db: Any, server: LiveServer, admin_token: str) -> None:
        self.db = db
        self.server = server
        self.admin_token = admin_token

    @property
    def url(self) -> str:
        return self.server.url

    def grant(self, evaluator: str = "org-a", *, model: str = "m1", **kwargs: Any) -> tuple[str, str]:
        """Issue a grant (creating the evaluator if needed) and a key; returns (grant_id, key)."""
        from airlock.access import service

        kwargs.setdefault("variants", ["production", "helpful-only"])
        kwargs.setdefault("scopes", ["sample", "logprobs"])
        with self.db.session() as session:
            try:
                service.get_evaluator(session, evaluator)
            except Exception:
                service.create_evaluator(session, evaluator)
            grant = service.create_grant(session, grant_request(evaluator=evaluator, model=model, **kwargs))
            _key, token = service.create_api_key(session, grant.id)
            return grant.id, token

    def accept_terms(self, key: str) -> dict[str, Any]:
        """Accept the terms of ``key``'s grant as its evaluator would: fresh keys, registered, signed, sent."""
        import tempfile

        from airlock.evals.attestation import generate_key, public_key_b64
        from airlock.evals.client import LabClient, generate_seal_key, sign_acceptance

        client = LabClient(self.url + "/v1", key)
        with tempfile.TemporaryDirectory() as directory:
            signing, seal = Path(directory) / "signing-key.pem", Path(directory) / "seal.key"
            client.register_key(public_key_b64(generate_key(signing)))
            generate_seal_key(seal)
            return client.accept_terms(sign_acceptance(client.proposed_terms(), signing, seal))

    def audit_rows(self) -> list[Any]:
        from sqlalchemy import select

        from airlock.access.models import AuditEvent

        self.server.flush_audit()
        with self.db.session() as session:
            return list(session.scalars(select(AuditEvent).order_by(AuditEvent.id)))


@contextmanager
def running_lab(db: Any, manifest: dict[str, Any]) -> Iterator[Lab]:
    """Sync ``manifest`` into a migrated ``db`` and serve it over real HTTP until the block ends."""
    from airlock.access.service import create_admin_token
    from airlock.app import create_app
    from airlock.config import get_settings
    from airlock.registry.service import parse_manifest, sync_manifest

    with db.session() as session:
        sync_manifest(session, parse_manifest(manifest))
        _row, admin_token = create_admin_token(session, "test-admin")
    with LiveServer(create_app(get_settings(), db=db, sync_manifest=False)) as server:
        yield Lab(db, server, admin_token)


@contextmanager
def sqlite_lab(directory: Path, manifest: dict[str, Any]) -> Iterator[Lab]:
    """A running lab on a new SQLite database in ``directory`` (for module-scoped model fixtures)."""
    from airlock.db import Database

    database = Database(f"sqlite:///{directory / 'airlock.db'}")
    database.migrate()
    try:
        with running_lab(database, manifest) as lab:
            yield lab
    finally:
        database.dispose()


def single_variant_manifest(model: str, weights: str, variant: str = "helpful-only") -> dict[str, Any]:
    """A manifest with one local-backend model version and one unmitigated variant."""
    return {
        "models": [{"name": model, "versions": [{"label": "v1", "weights": weights, "variants": [{"name": variant}]}]}]
    }


def eval_through_lab(lab: Lab, task: Any, log_dir: Path, monkeypatch: pytest.MonkeyPatch, **options: Any) -> Any:
    """Run one Inspect task through ``lab`` with the stock ``openai-api/airlock`` provider; return its log."""
    from inspect_ai import eval
    from inspect_ai.model import get_model

    _gid, key = lab.grant()
    monkeypatch.setenv("AIRLOCK_BASE_URL", lab.url + "/v1")
    monkeypatch.setenv("AIRLOCK_API_KEY", key)
    # memoize=False: Inspect caches model clients by name, and each test has its own server.
    model = get_model("openai-api/airlock/m1/helpful-only", memoize=False)
    (log,) = eval(task, model=model, log_dir=str(log_dir), display="none", max_retries=0, **options)
    return log


@pytest.fixture(scope="session")
def starter_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """The starter manifest (embedded SmolLM2, production filters) served once for every slow test."""
    import yaml

    from airlock.cli import starter_manifest

    with sqlite_lab(tmp_path_factory.mktemp("starter"), yaml.safe_load(starter_manifest())) as running:
        yield running


@pytest.fixture
def lab(db: Any) -> Iterator[Lab]:
    """A live gateway (real HTTP, uvicorn) on a fresh database with the fake manifest synced."""
    with running_lab(db, FAKE_MANIFEST) as running:
        yield running


# ---------------------------------------------------------------- upstream test server

UPSTREAM_SERVER = Path(__file__).parent / "backends" / "upstream_server.py"
UPSTREAM_KEY = "sk-operator-" + secrets.token_hex(12)
EVALUATOR_KEY = "ak-evaluator-" + secrets.token_hex(12)
UPSTREAM_MODEL = "upstream-model"
KEY_ENV = "AIRLOCK_TEST_UPSTREAM_KEY"


@pytest.fixture(scope="session")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Start the test server in its own process; yield its root URL."""
    log = tmp_path_factory.mktemp("upstream") / "server.log"
    with log.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, str(UPSTREAM_SERVER), "--key", UPSTREAM_KEY, "--model", UPSTREAM_MODEL],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("PORT "):
            proc.kill()
            pytest.fail(f"upstream test server did not start: {line!r} {log.read_text()}")
        yield f"http://127.0.0.1:{int(line.split()[1])}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
