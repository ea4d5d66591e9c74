"""Grant terms agreed by both sides: the lab proposes, the evaluator signs, the ledger records, work waits for it."""

from __future__ import annotations

import base64
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nacl.public import PrivateKey
from sqlalchemy import select

from airlock.access import acceptance
from airlock.access.acceptance import GrantAcceptance, TermsNotAcceptedError
from airlock.access.models import Grant
from airlock.access.seal import seal_grant
from airlock.canonical import canonical_bytes, iso_utc, sha256_hex
from airlock.db import utcnow
from airlock.evals.attestation import fingerprint, public_key_b64
from airlock.evals.models import SigningKey
from airlock.ledger import service as ledger
from tests.conftest import HTTP_TIMEOUT, Lab


def _client(lab: Lab, key: str) -> httpx.Client:
    return httpx.Client(base_url=lab.url, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def _register(client: httpx.Client) -> Ed25519PrivateKey:
    signing = Ed25519PrivateKey.generate()
    r = client.post("/v1/airlock/signing-keys", json={"public_key": public_key_b64(signing)})
    assert r.status_code == 201, r.text
    return signing


def _signed(signing: Ed25519PrivateKey, grant_id: str, digest: str, **over: Any) -> dict[str, Any]:
    """Build a signed acceptance body for ``digest`` (fields in ``over`` replace the signed ones after signing)."""
    seal = base64.b64encode(bytes(PrivateKey.generate().public_key)).decode()
    accepted_at = iso_utc(utcnow())
    document = acceptance.acceptance_document(grant_id, digest, seal, accepted_at)
    body = {
        "terms_sha256": digest,
        "seal_public_key": seal,
        "accepted_at": accepted_at,
        "signature": base64.b64encode(signing.sign(canonical_bytes(document))).decode(),
        "key_fingerprint": fingerprint(public_key_b64(signing)),
    }
    return {**body, **over}


def _edit_terms(lab: Lab, grant_id: str, **terms: Any) -> None:
    """Change a grant's terms as the lab, re-sealed (the proposal changes, so its hash does)."""
    with lab.db.session() as session:
        grant = session.get(Grant, grant_id)
        assert grant is not None
        grant.terms = {**grant.terms, **terms}
        session.flush()
        seal_grant(session, grant)


def test_accept_round_trip_ledger_and_voiding(lab: Lab) -> None:
    grant_id, key = lab.grant(scopes=["sample", "redteam"], variants=["helpful-only"])
    with _client(lab, key) as client:
        shown = client.get("/v1/airlock/grant/terms")
        assert shown.status_code == 200, shown.text
        data = shown.json()
        # The hash is the client's to recompute: SHA-256 of the proposal's RFC 8785 bytes.
        assert data["terms_sha256"] == sha256_hex(data["proposal"])
        assert data["proposal"]["format"] == "airlock.grant-terms/v1"
        assert data["proposal"]["terms"]["retention_redteam"] == "full"
        assert data["proposal"]["terms"]["retention_finetune"] == "none"
        assert data["acceptance"]["accepted"] is False and data["model"] == "m1"

        with lab.db.session() as session:
            grant = session.get(Grant, grant_id)
            assert grant is not None
            acceptance.require_acceptance(session, grant, "retention_finetune")  # none: nothing to accept
            with pytest.raises(TermsNotAcceptedError) as refused:
                acceptance.require_acceptance(session, grant, "retention_redteam")  # full: refused until accepted
            assert refused.value.status_code == 403 and refused.value.code == "terms_not_accepted"
            assert "retention_redteam=full" in refused.value.message and f"airlock grant accept {grant_id}" in (
                refused.value.message
            )
            assert acceptance.sealing_public_key(session, grant) is None

        signing = _register(client)
        body = _signed(signing, grant_id, data["terms_sha256"])
        accepted = client.post("/v1/airlock/grant/accept", json=body)
        assert accepted.status_code == 201, accepted.text
        assert accepted.json()["terms_sha256"] == data["terms_sha256"]
        again = client.post("/v1/airlock/grant/accept", json=body)  # the same signed acceptance: the same row
        assert again.status_code == 201 and again.json()["id"] == accepted.json()["id"]
        assert client.get("/v1/airlock/grant/terms").json()["acceptance"]["accepted"] is True

    with lab.db.session() as session:
        grant = session.get(Grant, grant_id)
        assert grant is not None
        acceptance.require_acceptance(session, grant, "retention_redteam")
        assert acceptance.sealing_public_key(session, grant) == base64.b64decode(body["seal_public_key"])
        (event,) = ledger.logged_events(session, ["grant.accepted"])
        # Offline: the logged document, key and signature verify with nothing but the entry.
        logged = event.body
        document = acceptance.acceptance_document(
            logged["grant"], logged["terms_sha256"], logged["seal_public_key"], logged["accepted_at"]
        )
        assert acceptance.verify_acceptance(document, logged["signature"], logged["signing_public_key"])
        assert fingerprint(logged["signing_public_key"]) == logged["key_fingerprint"]
        keys = {k.fingerprint: k for k in session.scalars(select(SigningKey))}

        def signer_of(fp: str) -> acceptance.SignerKey | None:
            k = keys.get(fp)
            return None if k is None else acceptance.SignerKey(k.evaluator_id, k.public_key, k.fingerprint)

        assert acceptance.check_acceptances(session, signer_of) == []
        # A row altered in the database no longer matches its ledger entry.
        row = session.scalars(select(GrantAcceptance)).one()
        row.seal_public_key = base64.b64encode(bytes(range(32))).decode()
        session.flush()
        assert any("differs from its ledger entry" in p for p in acceptance.check_acceptances(session, signer_of))
        session.rollback()

    # The admin view shows the state.
    admin = httpx.get(
        f"{lab.url}/v1/airlock/admin/grants/{grant_id}",
        headers={"Authorization": f"Bearer {lab.admin_token}"},
        timeout=HTTP_TIMEOUT,
    )
    state = admin.json()["acceptance"]
    assert state["accepted"] is True and state["key_fingerprint"] == body["key_fingerprint"]
    assert state["terms_sha256"] == data["terms_sha256"]

    # A lab edit to the terms voids the acceptance: work under `full` is refused again.
    _edit_terms(lab, grant_id, quota_total_tokens=1000)
    with lab.db.session() as session:
        grant = session.get(Grant, grant_id)
        assert grant is not None
        assert acceptance.current_acceptance(session, grant) is None
        with pytest.raises(TermsNotAcceptedError):
            acceptance.require_acceptance(session, grant, "retention_redteam")
    with _client(lab, key) as client:
        stale = client.post("/v1/airlock/grant/accept", json=_signed(signing, grant_id, data["terms_sha256"]))
        assert stale.status_code == 409 and stale.json()["error"]["code"] == "terms_changed"
        assert "changed since you read them" in stale.json()["error"]["message"]


def test_refusals(lab: Lab, tmp_path: Path) -> None:
    grant_id, key = lab.grant()
    other_id, other_key = lab.grant("org-b")
    with _client(lab, key) as client, _client(lab, other_key) as other:
        digest = client.get("/v1/airlock/grant/terms").json()["terms_sha256"]
        # An unregistered key: 403.
        r = client.post("/v1/airlock/grant/accept", json=_signed(Ed25519PrivateKey.generate(), grant_id, digest))
        assert r.status_code == 403 and r.json()["error"]["code"] == "unknown_signing_key"
        # Another organisation's registered key: 403 too.
        foreign = _register(other)
        r = client.post("/v1/airlock/grant/accept", json=_signed(foreign, grant_id, digest))
        assert r.status_code == 403 and r.json()["error"]["code"] == "unknown_signing_key"
        signing = _register(client)
        # A signature over something else (here: another seal key than the one sent): 400.
        forged = _signed(signing, grant_id, digest)
        forged["seal_public_key"] = _signed(signing, grant_id, digest)["seal_public_key"]
        r = client.post("/v1/airlock/grant/accept", json=forged)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_signature"
        # A signature by the right key for another grant: 400 (the grant id is signed).
        r = client.post("/v1/airlock/grant/accept", json=_signed(signing, other_id, digest))
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_signature"
        # An old acceptance, and a date written another way than signed: 400.
        old = iso_utc(utcnow() - timedelta(hours=2))
        r = client.post("/v1/airlock/grant/accept", json=_signed(signing, grant_id, digest, accepted_at=old))
        assert r.status_code == 400 and r.json()["error"]["code"] == "stale_acceptance"
        r = client.post(
            "/v1/airlock/grant/accept", json=_signed(signing, grant_id, digest, accepted_at="2026-01-01T00:00:00Z")
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == "accepted_at"
        # A seal key that is not 32 bytes: 400.
        bad_seal = base64.b64encode(b"x" * 31).decode() + "AAAA"
        r = client.post("/v1/airlock/grant/accept", json=_signed(signing, grant_id, digest, seal_public_key=bad_seal))
        assert r.status_code == 400
        # A revoked key: 403.
        with lab.db.session() as session:
            row = session.scalars(
                select(SigningKey).where(SigningKey.fingerprint == fingerprint(public_key_b64(signing)))
            ).one()
            row.revoked_at = utcnow()
        r = client.post("/v1/airlock/grant/accept", json=_signed(signing, grant_id, digest))
        assert r.status_code == 403 and r.json()["error"]["code"] == "signing_key_revoked"
    rows = [row for row in lab.audit_rows() if row.path == "/v1/airlock/grant/accept"]
    assert rows and all(row.outcome == "denied" or row.status_code >= 400 for row in rows)
    assert {row.error_code for row in rows} >= {"unknown_signing_key", "invalid_signature", "signing_key_revoked"}


def test_work_waits_for_acceptance_only_where_content_is_kept(lab: Lab) -> None:
    # Everything kept: fine-tuning, interp and red-teaming are refused until the terms are accepted.
    _gid, key = lab.grant(
        scopes=["sample", "finetune", "interp", "redteam"],
        retention_finetune="full",
        retention_interp="full",
    )
    # Nothing kept (red-teaming too): the same work needs no acceptance.
    _gid2, plain = lab.grant("org-b", scopes=["sample", "finetune", "interp", "redteam"], retention_redteam="none")
    job = {"model": "m1/helpful-only", "training_file": "file-none"}
    interp = {"model": "m1/helpful-only", "code": "def main():\n    return {}\n"}
    with _client(lab, key) as client, _client(lab, plain) as other:
        for path, body in (
            ("/v1/fine_tuning/jobs", job),
            ("/v1/airlock/interp/jobs", interp),
            ("/v1/airlock/redteam/sessions", {"models": ["m1/production"]}),
        ):
            refused = client.post(path, json=body)
            assert refused.status_code == 403, (path, refused.text)
            assert refused.json()["error"]["code"] == "terms_not_accepted"
            # Under `none` the acceptance gate is not reached: the request fails (or passes) on its own merits.
            assert other.post(path, json=body).json().get("error", {}).get("code") != "terms_not_accepted"
        assert other.post("/v1/chat/completions", json={"model": "m1/helpful-only", "messages": []}).status_code != 403
        lab.accept_terms(key)
        # Past the gate: the fake backend has no trainable weights, which is the next check's refusal.
        assert client.post("/v1/fine_tuning/jobs", json=job).status_code == 400
        assert client.post("/v1/airlock/interp/jobs", json=interp).status_code == 400
        opened = client.post("/v1/airlock/redteam/sessions", json={"models": ["m1/production"]})
        assert opened.status_code == 201, opened.text
    denied = [row for row in lab.audit_rows() if row.error_code == "terms_not_accepted"]
    assert len(denied) == 3 and all(row.status_code == 403 for row in denied)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_cli_keygen_terms_proposed_accept_and_ledger_check(
    lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from airlock.cli import app
    from airlock.config import get_settings, reset_settings
    from airlock.evals.client import default_seal_key_path, load_seal_key, seal_public_key_b64

    runner = CliRunner()
    grant_id, key = lab.grant(scopes=["redteam"])
    monkeypatch.setenv("AIRLOCK_BASE_URL", lab.url + "/v1")
    monkeypatch.setenv("AIRLOCK_API_KEY", key)
    signing = tmp_path / "keys" / "signing-key.pem"
    made = runner.invoke(app, ["evaluator", "keygen", "--register", "--out", str(signing)])
    assert made.exit_code == 0, made.output
    seal_path = default_seal_key_path(signing)
    assert seal_path == signing.parent / "seal.key" and seal_path.stat().st_mode & 0o777 == 0o600
    seal_public = seal_public_key_b64(load_seal_key(seal_path))
    assert f"seal public key: {seal_public}" in made.output

    shown = runner.invoke(app, ["grant", "terms-proposed"])
    assert shown.exit_code == 0 and "retention_redteam" in shown.output and "not accepted" in shown.output
    declined = runner.invoke(app, ["grant", "accept", grant_id, "--key", str(signing)], input="n\n")
    assert declined.exit_code != 0 and "not accepted" in declined.output
    wrong = runner.invoke(app, ["grant", "accept", "grant_other", "--yes", "--key", str(signing)])
    assert wrong.exit_code != 0 and grant_id in wrong.output
    accepted = runner.invoke(app, ["grant", "accept", grant_id, "--yes", "--key", str(signing)])
    assert accepted.exit_code == 0, accepted.output
    assert "recorded in the ledger" in accepted.output
    assert "accepted" in runner.invoke(app, ["grant", "terms-proposed"]).output
    with lab.db.session() as session:
        grant = session.get(Grant, grant_id)
        assert grant is not None
        assert acceptance.sealing_public_key(session, grant) == base64.b64decode(seal_public)

    # Offline: the exported bundle's grant.accepted entry verifies with nothing but the bundle.
    from airlock.ledger.verify import acceptance_problems, verify_bundle

    settings = get_settings()
    signer = ledger.get_signer(settings)
    ledger.sequence(lab.db)
    ledger.publish_checkpoint(lab.db, signer, force=True)
    report = verify_bundle(ledger.export_bundle(lab.db, signer), signer.verifier.vkey())
    assert report.ok, report.problems
    (entry,) = [e for e in report.entries if e.get("kind") == "grant.accepted"]
    issued = {grant_id}
    assert acceptance_problems(entry["body"], issued) == []
    forged = {**entry["body"], "seal_public_key": base64.b64encode(bytes(range(32))).decode()}
    assert any("does not verify" in p for p in acceptance_problems(forged, issued))
    assert any("no grant.issued" in p for p in acceptance_problems(entry["body"], set()))

    # The lab-side check verifies the acceptance; a row edited afterwards is reported.
    monkeypatch.setenv("AIRLOCK_DATABASE_URL", str(lab.db.engine.url.render_as_string(hide_password=False)))
    reset_settings()
    checked = runner.invoke(app, ["ledger", "check", "--no-audit"])
    assert checked.exit_code == 0 and "acceptances" in checked.output, checked.output
    with lab.db.session() as session:
        row = session.scalars(select(GrantAcceptance)).one()
        row.terms_sha256 = "0" * 64
    checked = runner.invoke(app, ["ledger", "check", "--no-audit"])
    assert checked.exit_code != 0 and "differs from its ledger entry" in " ".join(checked.output.split())


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_attested_results_wait_for_acceptance_under_full_evals_retention(lab: Lab, tmp_path: Path) -> None:
    from tests.publish.report_fixtures import make_org

    kept = make_org(lab.db, tmp_path, "org-kept", retention_evals="full")
    with pytest.raises(TermsNotAcceptedError, match="retention_evals=full"):
        kept.attest(lab.db)
    lab.accept_terms(kept.token)
    assert kept.attest(lab.db).startswith("res")
    plain = make_org(lab.db, tmp_path, "org-plain")  # retention_evals=none: no acceptance needed
    assert plain.attest(lab.db).startswith("res")
