"""Grant seals: a grants row edited in the database is refused, alerted and reported; honest changes keep working."""

from __future__ import annotations

import logging
import stat
import weakref
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import JSON, Boolean, Integer, String, bindparam, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeEngine
from typer.testing import CliRunner

from airlock.access import seal, service, terms
from airlock.access.models import AuditEvent, Grant
from airlock.config import get_settings, reset_settings
from airlock.db import Database, UTCDateTime, utcnow
from airlock.registry import service as registry
from tests.conftest import FAKE_MANIFEST, HTTP_TIMEOUT, Lab, grant_request

CHAT = {"model": "m1/production", "messages": [{"role": "user", "content": "hi"}]}
LOGPROBS = {**CHAT, "logprobs": True, "top_logprobs": 1}
WIDENED_SCOPES = ["finetune", "interp", "logprobs", "sample"]

# Every column a grant's seal covers. A column added to `grants` lands here (the test below fails
# until it is listed): each new column is a term unless it is pure bookkeeping like the usage counter.
# A capability's terms live in the `terms` column, each sealed under its own name.
SEALED = (
    "created_at",
    "created_by",
    "evaluator_id",
    "id",
    "issued_by_token_id",
    "model_id",
    "not_after",
    "not_before",
    "notes",
    "revoked_at",
    "revoked_reason",
    "scopes",
    "terms",
    "variants",
    "version_ids",
)


# ---------------------------------------------------------------- helpers


def _sql(db: Database, statement: str, **params: Any) -> None:
    """Edit rows behind the service's back, as someone with only database access would."""
    stmt = text(statement)
    typed: dict[str, TypeEngine[Any]] = {"scopes": JSON(), "terms": JSON(), "when": UTCDateTime()}
    stmt = stmt.bindparams(*(bindparam(name, type_=typed[name]) for name in params if name in typed))
    with db.engine.begin() as conn:
        assert conn.execute(stmt, params).rowcount == 1


def _issue(db: Database, evaluator: str = "org-a", **terms: Any) -> str:
    """Issue a grant through the service (creating the evaluator); return its id."""
    terms.setdefault("variants", ["production"])
    terms.setdefault("scopes", ["sample"])
    with db.session() as session:
        try:
            service.get_evaluator(session, evaluator)
        except Exception:
            service.create_evaluator(session, evaluator)
        return service.create_grant(session, grant_request(evaluator=evaluator, model="m1", **terms)).id


@pytest.fixture
def lab_db(db: Database) -> Database:
    """A migrated database with the fake manifest synced (no gateway)."""
    with db.session() as session:
        registry.sync_manifest(session, registry.parse_manifest(FAKE_MANIFEST))
    return db


def _fresh(db: Database) -> Database:
    """Another process's view of the same database: nothing loaded or cached yet."""
    return Database(db.url)


def _chat(http: httpx.Client, key: str, body: dict[str, Any] = CHAT) -> httpx.Response:
    return http.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})


def _alerts(rows: list[AuditEvent]) -> list[AuditEvent]:
    return [r for r in rows if r.outcome == seal.ALERT_OUTCOME]


def _cli(monkeypatch: pytest.MonkeyPatch, db: Database, *args: str) -> tuple[int, str]:
    from airlock.ledger.cli import app

    monkeypatch.setenv("AIRLOCK_DATABASE_URL", db.url)
    reset_settings()
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, " ".join(result.output.split())  # rich wraps long lines


# ---------------------------------------------------------------- what is sealed


def test_the_sealed_columns_are_pinned() -> None:
    assert terms.sealed_columns() == SEALED
    assert terms.sealed_keys() == tuple(sorted((set(SEALED) - {"terms"}) | set(terms.term_defaults())))
    assert {"seal", "tokens_used"} == terms.EXCLUDED_COLUMNS
    assert set(SEALED) | terms.EXCLUDED_COLUMNS == {c.name for c in Grant.__table__.columns}


def test_a_column_added_later_is_covered_without_a_change() -> None:
    class Base(DeclarativeBase):
        pass

    class Row(Base):
        __tablename__ = "rows"
        id: Mapped[str] = mapped_column(String(10), primary_key=True)
        scopes: Mapped[list[str]] = mapped_column(JSON, default=list)
        flag: Mapped[bool] = mapped_column(Boolean, default=False)
        extra: Mapped[int | None] = mapped_column(Integer, nullable=True)
        tokens_used: Mapped[int] = mapped_column(Integer, default=0)
        row_seal: Mapped[str | None] = mapped_column("seal", String(100), nullable=True)

    row = Row(id="r1", scopes=["sample"], flag=False, extra=None, tokens_used=5, row_seal="x")
    # NULL and declared defaults are left out, so a new column's default keeps old seals valid.
    assert terms.row_terms(row) == {"id": "r1", "scopes": ["sample"]}
    row.flag, row.extra, row.tokens_used = True, 7, 9
    assert terms.row_terms(row) == {"id": "r1", "scopes": ["sample"], "flag": True, "extra": 7}


def test_the_key_file_is_created_once_with_mode_600_and_seals_carry_its_id(lab_db: Database) -> None:
    path = get_settings().grant_seal_key_path
    assert not path.exists()
    grant_id = _issue(lab_db)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = seal.parse_key(path.read_text(), str(path))
    assert len(key.secret) == 32 and repr(key.secret.hex()) not in repr(key)
    _issue(lab_db, "org-b")
    assert seal.parse_key(path.read_text(), str(path)) == key
    with lab_db.session() as session:
        grant = session.get(Grant, grant_id)
        assert grant is not None and grant.seal is not None
        version, key_id, mac = grant.seal.split(":")
        assert (version, key_id, len(mac)) == ("gs1", key.key_id, 64)


def test_init_creates_the_key_file(airlock_env: Path) -> None:
    from airlock.cli import app

    result = CliRunner().invoke(app, ["init", "--no-admin-token"])
    assert result.exit_code == 0, result.output
    path = airlock_env / "grant-seal.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key_id = seal.parse_key(path.read_text(), str(path)).key_id
    assert f"(id {key_id};" in " ".join(result.output.split())


def test_a_value_canonical_json_cannot_hold_is_refused_not_a_crash(lab_db: Database) -> None:
    grant_id = _issue(lab_db, quota_total_tokens=1000)
    _sql(lab_db, "UPDATE grants SET terms = :terms WHERE id = :id", terms={"quota_total_tokens": 2**60}, id=grant_id)
    with lab_db.session() as session:
        with pytest.raises(seal.GrantIntegrityError) as refused:
            seal.check_grant(session, service.get_grant(session, grant_id))
        assert refused.value.reason == "unencodable"
        (line,) = seal.check_grants(session)
    assert "canonical JSON cannot represent" in line


def test_malformed_keys_are_refused_naming_their_source() -> None:
    with pytest.raises(seal.GrantSealKeyError, match="in AIRLOCK_GRANT_SEAL_KEY is not hex"):
        seal.parse_key("not hex", "AIRLOCK_GRANT_SEAL_KEY")
    with pytest.raises(seal.GrantSealKeyError, match="has 16 bytes; at least 32 are needed"):
        seal.parse_key("ab" * 16, "/x/grant-seal.key")


# ---------------------------------------------------------------- the attack, end to end


def test_a_grant_widened_in_the_database_is_refused_alerted_and_reported(
    lab: Lab, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    later = utcnow() + timedelta(days=1)
    grants = {
        "scopes": lab.grant("org-a", variants=["production"], scopes=["sample"]),
        "quota": lab.grant("org-b", variants=["production"], scopes=["sample"], quota_total_tokens=1000),
        "window": lab.grant("org-c", variants=["production"], scopes=["sample"], not_after=later),
        "revocation": lab.grant("org-d", variants=["production"], scopes=["sample"]),
    }
    ids = {name: gid for name, (gid, _key) in grants.items()}
    with httpx.Client(base_url=lab.url, timeout=HTTP_TIMEOUT) as http:
        for _gid, key in grants.values():
            assert _chat(http, key).status_code == 200
        refused = _chat(http, grants["scopes"][1], LOGPROBS)
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "scope_not_granted"
        with lab.db.session() as session:
            service.revoke_grant(session, ids["revocation"], "evaluation finished")
        assert _chat(http, grants["revocation"][1]).json()["error"]["code"] == "grant_revoked"

        # Someone with write access to the database, and nothing else:
        _sql(lab.db, "UPDATE grants SET scopes = :scopes WHERE id = :id", scopes=WIDENED_SCOPES, id=ids["scopes"])
        wider = {"quota_total_tokens": 10**9}
        _sql(lab.db, "UPDATE grants SET terms = :terms WHERE id = :id", terms=wider, id=ids["quota"])
        stretched = later + timedelta(days=365)
        _sql(lab.db, "UPDATE grants SET not_after = :when WHERE id = :id", when=stretched, id=ids["window"])
        _sql(lab.db, "UPDATE grants SET revoked_at = NULL, revoked_reason = NULL WHERE id = :id", id=ids["revocation"])

        caplog.set_level(logging.ERROR, logger="airlock.access.seal")
        for _gid, key in grants.values():
            for body in (CHAT, LOGPROBS):
                resp = _chat(http, key, body)
                assert resp.status_code == 403, resp.text
                error = resp.json()["error"]
                assert (error["type"], error["code"]) == ("permission_error", "grant_integrity_error")
                assert "failed its integrity check" in error["message"] and "alerted" in error["message"]
                assert "gs1" not in resp.text and "seal" not in error["message"]

    alerts = _alerts(lab.audit_rows())
    assert len(alerts) == 8 and {a.grant_id for a in alerts} == set(ids.values())
    for alert in alerts:
        assert (alert.status_code, alert.error_code) == (403, "grant_integrity_error")
        assert alert.detail["alert"] == "grant_integrity" and alert.detail["reason"] == "mismatch"
        assert alert.actor in ("org-a", "org-b", "org-c", "org-d") and alert.key_id is not None
    logged = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
    assert all(f"grant {gid} failed its integrity check" in logged for gid in ids.values())

    with lab.db.session() as session:
        lines = seal.check_grants(session)
    assert len(lines) == 4
    report = {name: next(line for line in lines if f"grant {gid} " in line) for name, gid in ids.items()}
    assert all("fails its seal (its terms differ from what was sealed)" in line for line in report.values())
    assert 'scopes (logged ["sample"], now ["finetune", "interp", "logprobs", "sample"])' in report["scopes"]
    assert "quota_total_tokens (logged 1000, now 1000000000)" in report["quota"]
    assert "not_after (logged" in report["window"]
    assert "is live, but the ledger records its revocation" in report["revocation"]

    code, output = _cli(monkeypatch, lab.db, "check", "--no-audit")
    assert code == 1
    assert all(f"grant {gid}" in output for gid in ids.values()), output


def test_honest_changes_through_the_service_keep_working(lab: Lab) -> None:
    grant_id, key = lab.grant("org-a", variants=["production"], scopes=["sample"], quota_total_tokens=10_000)
    admin = {"Authorization": f"Bearer {lab.admin_token}"}
    with httpx.Client(base_url=lab.url, timeout=HTTP_TIMEOUT) as http:
        assert _chat(http, key).status_code == 200
        lab.server.flush_audit()  # the audit writer adds usage to the row: a counter, not a term
        with lab.db.session() as session:
            assert service.get_grant(session, grant_id).tokens_used > 0
        assert _chat(http, key).status_code == 200

        created = http.post(
            "/v1/airlock/admin/grants",
            headers=admin,
            json={"evaluator": "org-a", "model": "m1", "variants": ["production"], "scopes": ["sample"]},
        )
        assert created.status_code == 201, created.text
        api_grant = created.json()["id"]
        minted = http.post(f"/v1/airlock/admin/grants/{api_grant}/keys", headers=admin, json={})
        assert _chat(http, minted.json()["key"]).status_code == 200
        assert http.post(f"/v1/airlock/admin/grants/{api_grant}/revoke", headers=admin, json={}).status_code == 200
        assert _chat(http, minted.json()["key"]).json()["error"]["code"] == "grant_revoked"
    assert _alerts(lab.audit_rows()) == []
    with lab.db.session() as session:
        assert seal.check_grants(session) == []


def test_a_result_attested_under_a_widened_grant_is_refused_as_an_alert(lab: Lab, tmp_path: Path) -> None:
    from airlock.evals.attestation import generate_key, public_key_b64, sign
    from tests.fakes import fake_attestation

    own, key = lab.grant("org-a", variants=["production"], scopes=["sample"])
    other, _key = lab.grant("org-a", variants=["production"], scopes=["sample"])
    # The result is about helpful-only, which neither grant covers until the row is widened.
    _sql(lab.db, "UPDATE grants SET variants = :scopes WHERE id = :id", scopes=["helpful-only", "production"], id=other)
    private = generate_key(tmp_path / "org-a.pem")
    with httpx.Client(
        base_url=lab.url + "/v1/airlock", headers={"Authorization": f"Bearer {key}"}, timeout=HTTP_TIMEOUT
    ) as http:
        assert http.post("/signing-keys", json={"public_key": public_key_b64(private)}).status_code == 201
        resp = http.post("/results", json=sign(fake_attestation(other), private))
    assert resp.status_code == 403 and resp.json()["error"]["code"] == "grant_integrity_error", resp.text
    (alert,) = _alerts(lab.audit_rows())
    assert (alert.grant_id, alert.detail["grant_id"], alert.status_code) == (own, other, 403)


# ---------------------------------------------------------------- the key: missing, replaced, rotated


def test_a_missing_key_file_stops_the_start_and_is_not_recreated(lab_db: Database) -> None:
    from airlock.app import bootstrap

    _issue(lab_db)
    path = get_settings().grant_seal_key_path
    path.unlink()
    fresh = _fresh(lab_db)
    try:
        with pytest.raises(seal.GrantSealKeyError, match=r"grant-seal\.key is missing, but 1 grant\(s\)"):
            bootstrap(get_settings(), fresh)
    finally:
        fresh.dispose()
    assert not path.exists()


def test_a_replaced_key_stops_the_start(lab_db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    from airlock.app import bootstrap

    _issue(lab_db)
    monkeypatch.setenv("AIRLOCK_GRANT_SEAL_KEY", "ab" * 32)
    reset_settings()
    fresh = _fresh(lab_db)
    try:
        with pytest.raises(seal.GrantSealKeyError, match=r"AIRLOCK_GRANT_SEAL_KEY, key id \w+\) sealed none of the 1"):
            bootstrap(get_settings(), fresh)
    finally:
        fresh.dispose()


def test_a_request_without_the_key_fails_closed_without_details(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    _gid, key = lab.grant("org-a")
    with httpx.Client(base_url=lab.url, timeout=HTTP_TIMEOUT) as http:
        assert _chat(http, key).status_code == 200
        # As if the process had never loaded the key and the file were gone since.
        monkeypatch.setattr(seal, "_SEALERS", weakref.WeakKeyDictionary())
        lab.server.app.state.gateway.auth.invalidate()  # nor authenticated anyone with it
        get_settings().grant_seal_key_path.unlink()
        resp = _chat(http, key)
    assert resp.status_code == 500
    assert resp.json()["error"]["code"] == "grant_seal_key_unavailable"
    assert "grant-seal.key" not in resp.text and str(get_settings().home_dir) not in resp.text


def test_a_seal_made_under_another_key_is_refused(lab: Lab) -> None:
    grant_id, key = lab.grant("org-a")
    other = seal.GrantSealer(seal.parse_key("cd" * 32, "elsewhere"))
    with lab.db.session() as session:
        forged = other.seal(service.get_grant(session, grant_id))
    _sql(lab.db, "UPDATE grants SET seal = :seal WHERE id = :id", seal=forged, id=grant_id)
    with httpx.Client(base_url=lab.url, timeout=HTTP_TIMEOUT) as http:
        assert _chat(http, key).json()["error"]["code"] == "grant_integrity_error"
    (alert,) = _alerts(lab.audit_rows())
    assert alert.detail["reason"] == "other_key"


def test_rotation_reseals_intact_grants_and_leaves_edited_ones_refused(
    lab_db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    intact, edited = _issue(lab_db, "org-a"), _issue(lab_db, "org-b")
    with lab_db.session() as session:
        service.revoke_grant(session, _issue(lab_db, "org-c"), "done")
    _sql(lab_db, "UPDATE grants SET scopes = :scopes WHERE id = :id", scopes=WIDENED_SCOPES, id=edited)
    path = get_settings().grant_seal_key_path
    old_id = seal.parse_key(path.read_text(), "old").key_id
    previous = path.rename(path.with_name("grant-seal.key.old"))

    code, output = _cli(monkeypatch, lab_db, "reseal-grants", "--previous-key", str(previous))
    assert code == 1, output
    assert "re-sealed 2 grant(s)" in output
    assert f"grant {edited}: its terms differ from what was sealed under the previous key; left refused" in output
    new_key = seal.parse_key(path.read_text(), str(path))
    assert new_key.key_id != old_id and stat.S_IMODE(path.stat().st_mode) == 0o600

    fresh = _fresh(lab_db)
    try:
        seal.prepare_grant_seals(fresh, get_settings())
        with fresh.session() as session:
            seal.check_grant(session, service.get_grant(session, intact))
            with pytest.raises(seal.GrantIntegrityError):
                seal.check_grant(session, service.get_grant(session, edited))
    finally:
        fresh.dispose()


# ---------------------------------------------------------------- grants issued before seals


def test_unsealed_grants_are_sealed_at_start_only_when_they_match_the_ledger(
    lab_db: Database, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from airlock.access import events

    original = events.grant_issued_event

    def before_seals(session: Any, grant: Grant) -> tuple[dict[str, Any], dict[str, Any]]:
        # What grant.issued logged before terms were committed and before the interp serving terms.
        body, confidential = original(session, grant)
        body.pop("interp_full_logits")
        quotas = {k: v for k, v in confidential["quotas"].items() if not k.startswith("interp_")}
        return body, {"quotas": quotas, "notes": confidential["notes"], "issued_by": confidential["issued_by"]}

    monkeypatch.setattr(events, "grant_issued_event", before_seals)
    old = {name: _issue(lab_db, name, quota_total_tokens=500) for name in ("org-a", "org-b", "org-c", "org-d")}
    monkeypatch.setattr(events, "grant_issued_event", original)
    with lab_db.session() as session:
        service.revoke_grant(session, old["org-d"], "over")
    new = _issue(lab_db, "org-e")
    for grant_id in [*old.values(), new]:  # as the migration leaves every existing grant
        _sql(lab_db, "UPDATE grants SET seal = NULL WHERE id = :id", id=grant_id)
    # Widened while unsealed: a scope (public body), a quota (committed), a term the old entry never had.
    _sql(lab_db, "UPDATE grants SET scopes = :scopes WHERE id = :id", scopes=WIDENED_SCOPES, id=old["org-b"])
    _sql(lab_db, "UPDATE grants SET terms = :terms WHERE id = :id", terms={"quota_total_tokens": 5000}, id=old["org-c"])
    _sql(lab_db, "UPDATE grants SET terms = :terms WHERE id = :id", terms={"interp_full_logits": True}, id=new)

    caplog.set_level(logging.WARNING, logger="airlock.access.seal")
    fresh = _fresh(lab_db)
    try:
        seal.prepare_grant_seals(fresh, get_settings())
        with fresh.session() as session:
            for grant_id in (old["org-a"], old["org-d"]):
                seal.check_grant(session, service.get_grant(session, grant_id))
            for grant_id in (old["org-b"], old["org-c"], new):
                with pytest.raises(seal.GrantIntegrityError) as refused:
                    seal.check_grant(session, service.get_grant(session, grant_id))
                assert refused.value.reason == "unsealed"
            lines = seal.check_grants(session)
    finally:
        fresh.dispose()
    errors = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
    assert "scopes (logged" in errors and "quotas.total_tokens (logged 500, now 5000)" in errors
    assert "interp_full_logits (logged false, now true)" in errors
    assert [line.split()[1] for line in lines] == [old["org-b"], old["org-c"], new]


# ---------------------------------------------------------------- uses outside a request


def test_a_check_outside_a_request_writes_its_own_alert(lab_db: Database) -> None:
    grant_id = _issue(lab_db)
    _sql(lab_db, "UPDATE grants SET variants = :scopes WHERE id = :id", scopes=["production", "base"], id=grant_id)
    with lab_db.session() as session, pytest.raises(seal.GrantIntegrityError):
        seal.verified_grant(session, grant_id, alert_db=lab_db, where="interp job ijob_test")
    with lab_db.session() as session:
        (alert,) = session.scalars(select(AuditEvent).where(AuditEvent.outcome == seal.ALERT_OUTCOME))
        assert (alert.grant_id, alert.actor_type, alert.path) == (grant_id, "system", "interp job ijob_test")
        assert alert.detail == {"alert": "grant_integrity", "grant_id": grant_id, "reason": "mismatch"}
        assert seal.verified_grant(session, "grant_missing") is None
