"""`airlock ledger check` reconciles every grant with its grant.issued / grant.revoked entries, not only its seal."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from airlock.access import seal, service
from airlock.access.models import Grant
from airlock.config import reset_settings
from airlock.db import Database, utcnow
from airlock.registry import service as registry
from tests.conftest import FAKE_MANIFEST, grant_request


@pytest.fixture
def issued(db: Database) -> dict[str, str]:
    """Grants as the service leaves them: live with every kind of term, and revoked."""
    with db.session() as session:
        registry.sync_manifest(session, registry.parse_manifest(FAKE_MANIFEST))
        for name in ("org-a", "org-b", "org-c"):
            service.create_evaluator(session, name)
        full = service.create_grant(
            session,
            grant_request(
                evaluator="org-a",
                model="m1",
                variants=["production", "helpful-only"],
                scopes=["sample", "interp"],
                not_after=utcnow() + timedelta(days=30),
                quota_total_tokens=5000,
                quota_interp_cpu_seconds=12.5,
                interp_full_logits=True,
                embargo_days=90,
                notes="pilot",
            ),
        )
        plain = service.create_grant(
            session, grant_request(evaluator="org-b", model="m1", variants=["production"], scopes=["sample"])
        )
        ended = service.create_grant(
            session, grant_request(evaluator="org-c", model="m1", variants=["base"], scopes=["sample"])
        )
        service.revoke_grant(session, ended.id, "evaluation finished")
        return {"full": full.id, "plain": plain.id, "ended": ended.id}


def _problems(db: Database) -> dict[str, str]:
    """Return ``check_grants`` lines by the grant id they name."""
    with db.session() as session:
        return {line.split()[1].rstrip(":"): line for line in seal.check_grants(session)}


def _with_key(db: Database, grant_id: str, **changes: Any) -> None:
    """Change a grant and re-seal it, as code holding the gateway's key could, without logging anything."""
    with db.session() as session:
        grant = session.get(Grant, grant_id)
        assert grant is not None
        for name, value in changes.items():
            setattr(grant, name, value)
        seal.seal_grant(session, grant)


def test_grants_as_the_service_left_them_pass(db: Database, issued: dict[str, str], monkeypatch: Any) -> None:
    from airlock.ledger import service as ledger
    from airlock.ledger.cli import app

    ledger.sequence(db)  # integrated entries and still-pending ones are both compared
    assert _problems(db) == {}
    monkeypatch.setenv("AIRLOCK_DATABASE_URL", db.url)
    reset_settings()
    result = CliRunner().invoke(app, ["check"])
    assert result.exit_code == 0, result.output
    assert "grant seals, terms and signed acceptances" in " ".join(result.output.split())  # however it wraps


def test_a_change_sealed_with_the_key_but_never_logged_is_reported(db: Database, issued: dict[str, str]) -> None:
    # The seal holds (whoever did this had the key); only the ledger can tell.
    _with_key(db, issued["full"], terms={"quota_total_tokens": 5_000_000}, scopes=["finetune", "interp", "sample"])
    _with_key(db, issued["ended"], revoked_at=utcnow() + timedelta(days=1))
    _with_key(db, issued["plain"], revoked_at=utcnow(), revoked_reason="quietly")
    problems = _problems(db)
    assert set(problems) == set(issued.values())
    assert not any("fails its seal" in line for line in problems.values())
    full = problems[issued["full"]]
    assert "quota_total_tokens (logged 5000, now 5000000)" in full
    assert "quotas.total_tokens (logged 5000, now 5000000)" in full
    assert 'scopes (logged ["interp", "sample"], now ["finetune", "interp", "sample"])' in full
    assert "differs from its grant.revoked entry" in problems[issued["ended"]]
    assert "revoked_at (logged" in problems[issued["ended"]]
    assert "is revoked, but the ledger has no grant.revoked entry" in problems[issued["plain"]]


def test_a_copied_grant_a_deleted_grant_and_an_altered_opening_are_reported(
    db: Database, issued: dict[str, str]
) -> None:
    columns = ", ".join(c.name for c in Grant.__table__.columns if c.name != "id")
    with db.engine.begin() as conn:
        # A second live grant cloned from a real one, seal included: the seal names its grant's id.
        conn.execute(
            text(f"INSERT INTO grants (id, {columns}) SELECT 'grant_clone', {columns} FROM grants WHERE id = :id"),
            {"id": issued["plain"]},
        )
        conn.execute(text("DELETE FROM grants WHERE id = :id"), {"id": issued["ended"]})
        # The kept opening of the full grant's terms no longer opens the published commitment.
        conn.execute(
            text("UPDATE ledger_commitments SET value = :v WHERE field = 'terms' AND value LIKE :pattern"),
            {"v": json.dumps({"id": issued["full"]}), "pattern": f"%{issued['full']}%"},
        )
    problems = _problems(db)
    clone = problems["grant_clone"]
    assert "fails its seal (its terms differ from what was sealed)" in clone
    assert "has no grant.issued entry in the ledger" in clone
    assert problems[issued["ended"]].endswith("logged in the ledger, but the database has no such grant")
    assert "terms (its committed value cannot be opened" in problems[issued["full"]]
    assert issued["plain"] not in problems
