"""Operations: `airlock migrate` as its own step, readiness after weights load, Prometheus metrics, `airlock worker`."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from airlock.backends.registry import register_backend
from airlock.config import get_settings, reset_settings
from airlock.db import Database
from airlock.errors import ConfigError
from tests.conftest import FAKE_MANIFEST, HTTP_TIMEOUT, LiveServer, running_lab
from tests.fakes import EchoBackend

runner = CliRunner()


def _cli(*args: str) -> Any:
    from airlock.cli import app

    return runner.invoke(app, list(args))


# ---------------------------------------------------------------- migrations are one explicit step


def test_serve_and_bootstrap_refuse_an_unmigrated_database_and_migrate_brings_it_to_head(airlock_env: Path) -> None:
    from airlock.app import bootstrap
    from airlock.migrations import schema_state

    db = Database(get_settings().db_url)
    try:
        with pytest.raises(ConfigError, match=r"run `airlock migrate` first") as refused:
            bootstrap(get_settings(), db)
        assert refused.value.code == "schema_not_migrated"
        assert schema_state(db.engine).current is None  # refusing migrated nothing

        served = _cli("serve", "--port", "1")
        assert served.exit_code == 1 and "airlock migrate" in served.output, served.output

        check = _cli("migrate", "--check")
        assert check.exit_code == 1 and "pending" in check.output, check.output

        done = _cli("migrate")
        assert done.exit_code == 0, done.output
        state = schema_state(db.engine)
        assert state.at_head and state.pending == ()
        assert _cli("migrate", "--check").exit_code == 0
        assert "nothing to migrate" in _cli("migrate").output
        bootstrap(get_settings(), db)  # now accepted
    finally:
        db.dispose()


def test_a_database_migrated_by_a_newer_release_is_refused(db: Database) -> None:
    from sqlalchemy import text

    with db.session() as session:
        session.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    with pytest.raises(ConfigError, match="upgrade Airlock"):
        db.require_migrated()


# ---------------------------------------------------------------- readiness follows the weights


class GatedBackend(EchoBackend):
    """A backend whose start (its weights loading) waits for the test to open the gate."""

    gate = threading.Event()

    async def start(self) -> None:
        await asyncio.to_thread(self.gate.wait, 60)
        await super().start()


def _wait_for(predicate: Any, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


def test_readyz_turns_ready_only_after_every_backend_has_loaded(db: Database) -> None:
    from airlock.app import create_app
    from airlock.registry.service import parse_manifest, sync_manifest

    register_backend("gated", GatedBackend)
    GatedBackend.gate.clear()
    manifest = {
        "models": [
            {
                "name": "g1",
                "versions": [
                    {"label": "v1", "content_hash": "c" * 64, "variants": [{"name": "x", "backend": "gated"}]}
                ],
            }
        ]
    }
    with db.session() as session:
        sync_manifest(session, parse_manifest(manifest))
    app = create_app(get_settings(), db=db, sync_manifest=False, load_weights=True)
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=HTTP_TIMEOUT) as http:
        assert http.get("/healthz").status_code == 200  # alive while loading
        loading = http.get("/readyz")
        assert loading.status_code == 503
        (step,) = [s for s in loading.json()["steps"] if s["name"].startswith("gated backend")]
        assert step["state"] == "running"
        GatedBackend.gate.set()
        _wait_for(lambda: http.get("/readyz").status_code == 200, "readyz never turned 200")
        assert all(s["state"] == "done" for s in http.get("/readyz").json()["steps"])


# ---------------------------------------------------------------- metrics


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_count_requests_and_tokens_per_grant_without_content_and_only_for_scrapers(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    from airlock.access.service import create_admin_token
    from airlock.jobs.service import enqueue as create_job

    monkeypatch.setenv("AIRLOCK_METRICS_TOKEN", "scrape-secret-0123456789")
    monkeypatch.setenv("AIRLOCK_RUN_JOBS", "false")  # the queued job below must stay queued
    reset_settings()
    with running_lab(db, FAKE_MANIFEST) as lab, httpx.Client(base_url=lab.url, timeout=HTTP_TIMEOUT) as http:
        grant_id, key = lab.grant("org-a")
        with db.session() as session:
            _row, reviewer = create_admin_token(session, "rita", role="reviewer")
            create_job(session, "fine_tune", params={}, evaluator_id=None, grant_id=grant_id)
        prompt = "SECRET-PROMPT-CONTENT tell me"
        resp = http.post(
            "/v1/chat/completions",
            headers={"Authorization": f"Bearer {key}"},
            json={"model": "m1/helpful-only", "messages": [{"role": "user", "content": prompt}], "max_tokens": 8},
        )
        assert resp.status_code == 200, resp.text
        usage = resp.json()["usage"]
        lab.server.flush_audit()

        assert http.get("/metrics").status_code == 401
        assert http.get("/metrics", headers={"Authorization": f"Bearer {key}"}).status_code == 401
        assert http.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        denied = http.get("/metrics", headers={"Authorization": f"Bearer {reviewer}"})
        assert denied.status_code == 403 and denied.json()["error"]["code"] == "role_not_allowed"
        by_admin = http.get("/metrics", headers={"Authorization": f"Bearer {lab.admin_token}"})
        assert by_admin.status_code == 200
        scraped = http.get("/metrics", headers={"Authorization": "Bearer scrape-secret-0123456789"})
        assert scraped.status_code == 200 and scraped.headers["content-type"].startswith("text/plain")

    text = scraped.text
    assert "SECRET-PROMPT-CONTENT" not in text and key not in text
    samples = _samples(text)
    chat = frozenset(
        {
            ("endpoint", "/v1/chat/completions"),
            ("method", "POST"),
            ("status", "200"),
            ("outcome", "allowed"),
            ("grant", grant_id),
        }
    )
    assert samples[("airlock_requests_total", chat)] == 1
    served = {("grant", grant_id), ("model", "m1/helpful-only"), ("variant", "helpful-only")}
    tokens_in = frozenset(served | {("direction", "in")})
    tokens_out = tokens_in - {("direction", "in")} | {("direction", "out")}
    assert samples[("airlock_tokens_total", tokens_in)] == usage["prompt_tokens"]
    assert samples[("airlock_tokens_total", tokens_out)] == usage["completion_tokens"]
    latency = [v for (name, labels), v in samples.items() if name == "airlock_request_latency_seconds_count"]
    assert sum(latency) >= 1
    assert samples[("airlock_job_queue_depth", frozenset({("kind", "fine_tune")}))] == 1
    assert samples[("airlock_jobs", frozenset({("kind", "fine_tune"), ("status", "queued")}))] == 1
    # 401 probes of unknown paths collapse into one label instead of one series per URL.
    unmatched = [labels for (name, labels) in samples if name == "airlock_requests_total"]
    assert all(dict(labels)["endpoint"] != "/metrics/x" for labels in unmatched)


def test_endpoint_labels_hide_ids_and_bound_unmatched_paths() -> None:
    from airlock.access.metrics import endpoint_label

    assert endpoint_label("/v1/airlock/grants/grant_3f9c0a1b2c3d4e5f/revoke", 200) == "/v1/airlock/grants/{id}/revoke"
    assert endpoint_label("/v1/fine_tuning/jobs/ftjob_0123456789abcdef/events", 200).endswith("/{id}/events")
    assert endpoint_label("/wp-admin/anything-an-attacker-types", 404) == "unmatched"


# ---------------------------------------------------------------- the standalone worker


def test_worker_refuses_an_unmigrated_database(airlock_env: Path) -> None:
    result = _cli("worker")
    assert result.exit_code == 1 and "airlock migrate" in result.output


def test_worker_runs_queued_jobs_without_the_http_server_and_stops_on_sigterm(db: Database, tmp_path: Path) -> None:
    from sqlalchemy import select

    from airlock.jobs.models import Job
    from airlock.jobs.service import enqueue as create_job

    with db.session() as session:
        # A fine-tuning job whose training file does not exist: the worker must claim it and fail it.
        job = create_job(
            session, "fine_tune", params={"training_file": "file_missing"}, evaluator_id=None, grant_id=None
        )
        job_id = job.id
    env = {**os.environ, "AIRLOCK_DATABASE_URL": db.url, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "airlock", "worker", "--log-level", "warning"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:

        def finished() -> bool:
            with db.session() as session:
                return session.scalar(select(Job.status).where(Job.id == job_id)) in {"failed", "succeeded"}

        _wait_for(finished, "the worker never finished the queued job", timeout=120)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    assert "worker: running jobs" in output and "worker: stopping" in output
