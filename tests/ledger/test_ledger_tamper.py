"""Tampering with any stored row, entry or checkpoint is detected (edits made directly in the database)."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import text

from airlock.access.audit import AUDIT_DIGEST
from airlock.db import Database, utcnow
from airlock.errors import AirlockError
from airlock.ledger import service
from airlock.ledger._merkle import ProofError, verify_inclusion
from airlock.ledger._note import Signer, verify_checkpoint
from airlock.ledger.verify import verify_bundle
from tests.conftest import FAKE_MANIFEST

Edit = Callable[[Any], None]


@pytest.fixture
def signer() -> Signer:
    """A throwaway lab key."""
    return Signer("test.example/ledger", Ed25519PrivateKey.generate())


@pytest.fixture
def filled(db: Database, signer: Signer) -> Database:
    """A ledger with registry, grant and audit-digest entries and two checkpoints, verified clean."""
    from airlock.access import service as access
    from airlock.access.models import AuditEvent
    from airlock.registry import service as registry

    with db.session() as session:
        registry.sync_manifest(session, registry.parse_manifest(FAKE_MANIFEST))
        access.create_evaluator(session, "org-a")
        access.create_grant(
            session, access.GrantRequest(evaluator="org-a", model="m1", variants=["production"], scopes=["sample"])
        )
        for i in range(5):
            session.add(
                AuditEvent(
                    ts=utcnow() - timedelta(minutes=1),
                    request_id=f"req{i}",
                    actor_type="evaluator",
                    actor="org-a",
                    method="POST",
                    path="/v1/chat/completions",
                    status_code=200,
                    outcome="allowed",
                    tokens_out=10 + i,
                )
            )
    service.publish_checkpoint(db, signer)
    service.digest_audit(db, AUDIT_DIGEST)
    service.publish_checkpoint(db, signer)
    assert service.check_database(db, signer, audit=AUDIT_DIGEST) == []
    assert verify_bundle(service.export_bundle(db, signer), signer.verifier.vkey()).ok
    return db


def _sql(db: Database, statement: str, **params: Any) -> None:
    with db.engine.begin() as conn:
        assert conn.execute(text(statement), params).rowcount >= 1


def _edit_entry_body(db: Database) -> None:
    with db.engine.begin() as conn:
        idx, entry = conn.execute(text("SELECT idx, entry FROM ledger_entries WHERE kind = 'grant.issued'")).one()
        conn.execute(
            text("UPDATE ledger_entries SET entry = :e WHERE idx = :i"),
            {"e": entry.replace('"scopes":["sample"]', '"scopes":["sample","finetune"]'), "i": idx},
        )


def _edit_entry_and_leaf(db: Database) -> None:
    from airlock.ledger._merkle import leaf_hash

    with db.engine.begin() as conn:
        idx, entry = conn.execute(text("SELECT idx, entry FROM ledger_entries WHERE kind = 'grant.issued'")).one()
        forged = entry.replace('"evaluator":"org-a"', '"evaluator":"org-z"')
        conn.execute(
            text("UPDATE ledger_entries SET entry = :e, leaf_hash = :h WHERE idx = :i"),
            {"e": forged, "h": leaf_hash(forged.encode()), "i": idx},
        )


def _edit_leaf_hash(db: Database) -> None:
    _sql(db, "UPDATE ledger_entries SET leaf_hash = :h WHERE idx = 3", h=b"\x00" * 32)


def _edit_node(db: Database) -> None:
    with db.engine.begin() as conn:
        key = conn.execute(text("SELECT min(key) FROM ledger_nodes")).scalar_one()
        conn.execute(text("UPDATE ledger_nodes SET hash = :h WHERE key = :k"), {"h": b"\x11" * 32, "k": key})


def _edit_checkpoint_signature(db: Database) -> None:
    with db.engine.begin() as conn:
        cid, note = conn.execute(text("SELECT id, note FROM ledger_checkpoints ORDER BY id LIMIT 1")).one()
        body, sig = note.rsplit(" ", 1)
        flipped = sig[:10] + ("A" if sig[10] != "A" else "B") + sig[11:]
        conn.execute(
            text("UPDATE ledger_checkpoints SET note = :n WHERE id = :i"), {"n": f"{body} {flipped}", "i": cid}
        )


def _edit_checkpoint_root(db: Database) -> None:
    with db.engine.begin() as conn:
        cid, note = conn.execute(text("SELECT id, note FROM ledger_checkpoints ORDER BY id LIMIT 1")).one()
        lines = note.split("\n")
        lines[2] = "A" * 43 + "="
        conn.execute(
            text("UPDATE ledger_checkpoints SET note = :n, root_hash = :r WHERE id = :i"),
            {"n": "\n".join(lines), "r": b"\x00" * 32, "i": cid},
        )


def _delete_last_entry(db: Database) -> None:
    _sql(db, "DELETE FROM ledger_entries WHERE idx = (SELECT max(idx) FROM ledger_entries)")


def _edit_state_root(db: Database) -> None:
    _sql(db, "UPDATE ledger_state SET root_hash = :h WHERE id = 1", h=b"\x22" * 32)


def _edit_audit_row(db: Database) -> None:
    _sql(db, "UPDATE audit_events SET status_code = 403, outcome = 'denied' WHERE request_id = 'req2'")


def _delete_audit_row(db: Database) -> None:
    _sql(db, "DELETE FROM audit_events WHERE request_id = 'req4'")


def _edit_commitment(db: Database) -> None:
    _sql(db, "UPDATE ledger_commitments SET value = '\"other notes\"' WHERE field = 'notes'")


EDITS: dict[str, Edit] = {
    "entry body": _edit_entry_body,
    "entry body and its leaf hash": _edit_entry_and_leaf,
    "leaf hash": _edit_leaf_hash,
    "tree node": _edit_node,
    "checkpoint signature": _edit_checkpoint_signature,
    "checkpoint root": _edit_checkpoint_root,
    "deleted entry": _delete_last_entry,
    "tree state root": _edit_state_root,
    "audit row edited": _edit_audit_row,
    "audit row deleted": _delete_audit_row,
    "commitment opening": _edit_commitment,
}
# Edits a public verifier holding only the bundle must catch too (the others live in lab-private
# tables or columns that are not published: the lab-side check and served proofs catch them).
PUBLIC = {
    "entry body",
    "entry body and its leaf hash",
    "checkpoint signature",
    "checkpoint root",
    "deleted entry",
    "tree state root",
}
# Public edits the lab's own export refuses to publish (each branch of the test is taken on purpose).
EXPORT_REFUSED = {"deleted entry"}


@pytest.mark.parametrize("edit", list(EDITS), ids=list(EDITS))
def test_edit_is_detected(filled: Database, signer: Signer, edit: str) -> None:
    """The lab-side check flags every edit; the offline bundle verifier flags every edit to public data."""
    EDITS[edit](filled)
    assert service.check_database(filled, signer, audit=AUDIT_DIGEST), f"{edit} went unnoticed by the lab-side check"
    if edit in EXPORT_REFUSED:
        # The lab cannot even build proofs from the damaged log: noticed before publication.
        with pytest.raises(AirlockError, match="inconsistent"):
            service.export_bundle(filled, signer)
    elif edit in PUBLIC:
        bundle = service.export_bundle(filled, signer)
        assert not verify_bundle(bundle, signer.verifier.vkey()).ok, f"{edit} went unnoticed by the offline verifier"


def test_edited_leaf_hash_breaks_served_inclusion_proofs(filled: Database, signer: Signer) -> None:
    """A proof served from an edited leaf no longer leads to the signed root."""
    _edit_leaf_hash(filled)
    with filled.session() as session:
        cp = verify_checkpoint(service.latest_checkpoint(session).note, signer.verifier)  # type: ignore[union-attr]
        p = service.inclusion_proof(session, 3, cp.size)
    with pytest.raises(ProofError):
        verify_inclusion(p.leaf_hash, 3, cp.size, p.proof, cp.root)


def _bundle_edits() -> dict[str, Callable[[dict[str, Any]], None]]:
    def entry(b: dict[str, Any]) -> None:
        edited = b["entries"][1].replace('"v":2', '"v":3')
        assert edited != b["entries"][1]
        b["entries"][1] = edited

    def swap(b: dict[str, Any]) -> None:
        b["entries"][0], b["entries"][1] = b["entries"][1], b["entries"][0]

    def non_canonical(b: dict[str, Any]) -> None:
        b["entries"][0] = json.dumps(json.loads(b["entries"][0]), indent=1)

    def drop_proof(b: dict[str, Any]) -> None:
        b["consistency"] = []

    def forged_proof(b: dict[str, Any]) -> None:
        b["consistency"][0]["proof"][0] = "A" * 43 + "="

    def reorder_checkpoints(b: dict[str, Any]) -> None:
        b["checkpoints"].reverse()

    def forged_reveal(b: dict[str, Any]) -> None:
        target = json.loads(b["entries"][0])
        reveal = {
            "v": 1,
            "id": "lev_forged",
            "kind": "commitment.revealed",
            "time": target["time"],
            "body": {"event": target["id"], "openings": [{"field": "secret", "salt": "00" * 32, "value": 7}]},
        }
        b["entries"].append(json.dumps(reveal, sort_keys=True, separators=(",", ":")))

    def other_key(b: dict[str, Any]) -> None:
        b["public_key"] = Signer("test.example/ledger", Ed25519PrivateKey.generate()).verifier.vkey()

    return {
        "entry": entry,
        "swapped entries": swap,
        "non-canonical entry": non_canonical,
        "missing consistency proof": drop_proof,
        "forged consistency proof": forged_proof,
        "checkpoints out of order": reorder_checkpoints,
        "substituted key": other_key,
        "appended unsigned reveal": forged_reveal,
    }


BUNDLE_EDITS = _bundle_edits()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    """One clean bundle (SQLite; the bundle does not depend on the database) with two checkpoint sizes."""
    signer = Signer("test.example/ledger", Ed25519PrivateKey.generate())
    db = Database(f"sqlite:///{tmp_path_factory.mktemp('bundle') / 'airlock.db'}")
    db.migrate()
    with db.session() as session:
        for i in range(11):
            service.record_event(session, "test.event", {"i": i}, confidential={"secret": i})
    service.publish_checkpoint(db, signer)
    with db.session() as session:
        for i in range(6):
            service.record_event(session, "test.event", {"i": 100 + i})
    bundle = service.export_bundle(db, signer)
    db.dispose()
    return bundle, signer.verifier.vkey()


@pytest.mark.parametrize("edit", list(BUNDLE_EDITS), ids=list(BUNDLE_EDITS))
def test_bundle_edit_is_detected(exported: tuple[dict[str, Any], str], edit: str) -> None:
    """Editing the exported bundle itself fails offline verification against the pinned key."""
    bundle, vkey = exported
    assert verify_bundle(bundle, vkey).ok
    forged = copy.deepcopy(bundle)
    BUNDLE_EDITS[edit](forged)
    assert not verify_bundle(forged, vkey).ok


def test_trust_fails_closed_without_a_pinned_key(exported: tuple[dict[str, Any], str], tmp_path: Path) -> None:
    """A bundle carries its own key, so only a pinned key can pass; the unsafe flag warns and still checks."""
    from airlock.ledger.verify import UNPINNED, run

    bundle, vkey = exported
    assert verify_bundle(bundle, None).problems == [UNPINNED]
    path = tmp_path / "bundle.json"
    path.write_text(json.dumps(bundle))
    code, out = run(path, key=None, model=None, version=None)
    assert code == 1 and "no pinned key" in out and "OK:" not in out
    code, out = run(path, key=None, model=None, version=None, trust_bundle_key=True)
    assert code == 0 and "WARNING: --unsafe-trust-bundle-key" in out and "OK:" in out
    code, out = run(path, key=vkey, model=None, version=None)
    assert code == 0 and "key: pinned and matching" in out and "WARNING" not in out
    forged = copy.deepcopy(bundle)
    BUNDLE_EDITS[next(iter(BUNDLE_EDITS))](forged)
    path.write_text(json.dumps(forged))
    code, out = run(path, key=None, model=None, version=None, trust_bundle_key=True)
    assert code == 1 and "WARNING" in out and "FAILED" in out
