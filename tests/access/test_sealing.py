"""Sealed retention: items sealed to the evaluator's key, the keep/seal/drop decision, release checked and logged."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
from nacl.public import PrivateKey, SealedBox

from airlock.access import sealing, service
from airlock.errors import ConflictError, InvalidRequestError, NotFoundError
from airlock.ledger import service as ledger
from tests.conftest import FAKE_MANIFEST, grant_request

SECRET = b"CANARY-sealing-unit 0123456789"


def _grant(db: Any, **terms: Any) -> Any:
    from airlock.registry.service import parse_manifest, sync_manifest

    terms.setdefault("variants", ["helpful-only"])
    terms.setdefault("scopes", ["sample"])
    with db.session() as session:
        try:
            service.get_evaluator(session, "org-s")
        except Exception:
            sync_manifest(session, parse_manifest(FAKE_MANIFEST))
            service.create_evaluator(session, "org-s")
        grant = service.create_grant(session, grant_request(evaluator="org-s", model="m1", **terms))
        session.expunge(grant)
        return grant


def _events(session: Any, kind: str) -> list[dict[str, Any]]:
    return [event.body for event in ledger.logged_events(session, [kind])]


def test_seal_store_open_and_release(db: Any, tmp_path: Path) -> None:
    key = PrivateKey.generate()
    grant = _grant(db)
    with db.session() as session:
        item = sealing.seal_bytes(
            session,
            grant_id=grant.id,
            evaluator_id=grant.evaluator_id,
            public_key=bytes(key.public_key),
            capability="interp",
            kind="interp_code",
            ref="ijob_x",
            name="code.py",
            data=SECRET,
            home=tmp_path,
        )
        item_id = item.id
    stored = list((tmp_path / "sealed").iterdir())
    assert [p.name for p in stored] == [f"{item_id}.sealed"]
    assert SECRET not in stored[0].read_bytes()  # the lab holds ciphertext only
    with db.session() as session:
        item = sealing.own_item(session, grant.id, item_id)
        assert item.plaintext_sha256 == hashlib.sha256(SECRET).hexdigest() and item.size == len(SECRET)
        assert item.recipient_sha256 == hashlib.sha256(bytes(key.public_key)).hexdigest()
        box = sealing.ciphertext(item, tmp_path)
        assert SealedBox(key).decrypt(box) == SECRET  # only the evaluator's key opens it
        stored_events = _events(session, "sealed.stored")
        assert stored_events[-1]["item"] == item_id and stored_events[-1]["sha256"] == item.plaintext_sha256
        assert all(SECRET.decode() not in str(body) for body in stored_events)
        with pytest.raises(NotFoundError):
            sealing.own_item(session, "grant_other", item_id)  # private to its grant
        with pytest.raises(ConflictError) as sealed_still:
            sealing.released_content(item, tmp_path)
        assert sealed_still.value.code == "sealed_item_not_released"

    # Wrong plaintext: 400, nothing written, nothing recorded.
    with db.session() as session:
        item = sealing.get_item(session, item_id)
        with pytest.raises(InvalidRequestError) as wrong:
            sealing.release(session, item, SECRET + b"!", released_by="org-s", home=tmp_path)
        assert wrong.value.code == "sealed_plaintext_mismatch"
    with db.session() as session:
        assert sealing.get_item(session, item_id).released_at is None
        assert _events(session, "sealed.released") == []
    assert not (tmp_path / "sealed" / f"{item_id}.released").exists()

    # A release whose transaction rolls back leaves no readable copy behind.
    with pytest.raises(RuntimeError), db.session() as session:
        sealing.release(session, sealing.get_item(session, item_id), SECRET, released_by="org-s", home=tmp_path)
        assert (tmp_path / "sealed" / f"{item_id}.released").exists()
        raise RuntimeError("abort")
    assert not (tmp_path / "sealed" / f"{item_id}.released").exists()

    with db.session() as session:
        sealing.release(session, sealing.get_item(session, item_id), SECRET, released_by="org-s", home=tmp_path)
    with db.session() as session:
        item = sealing.get_item(session, item_id)
        assert item.released_at is not None and item.released_by == "org-s"
        assert sealing.released_content(item, tmp_path) == SECRET
        released = _events(session, "sealed.released")
        assert [(e["item"], e["grant"], e["sha256"], e["released_by"]) for e in released] == [
            (item_id, grant.id, item.plaintext_sha256, "org-s")
        ]
        with pytest.raises(ConflictError) as again:
            sealing.release(session, item, SECRET, released_by="org-s", home=tmp_path)
        assert again.value.code == "sealed_item_released"


def test_one_decision_per_path_keep_seal_drop(db: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    full = _grant(db, retention_interp="full")
    none = _grant(db)
    sealed = _grant(db, retention_interp="sealed", retention_redteam="sealed")
    with db.session() as session:
        assert sealing.disposition(session, full.id, "interp").action == "keep"
        assert sealing.disposition(session, none.id, "interp").action == "drop"
        assert sealing.disposition(session, none.id, "redteam").action == "keep"  # red-team's own default: full
        assert sealing.disposition(session, "grant_missing", "interp").action == "drop"
        monkeypatch.setattr(sealing, "sealing_public_key", lambda _s, _g: None)
        # Sealed agreed but no seal key to seal to: fail closed (drop) and say so in the ledger.
        plan = sealing.disposition(session, sealed.id, "interp")
        assert plan.action == "drop" and "no current acceptance" in plan.reason
        assert sealing.dispose(session, plan, kind="interp_code", ref="ijob_y", name="code.py", data=SECRET) is None
        assert _events(session, "sealed.dropped")[-1]["ref"] == "ijob_y"
        with pytest.raises(sealing.NoSealingKeyError):
            sealing.seal_content(
                session, sealed, capability="interp", kind="interp_code", ref="r", name="n", data=SECRET, home=tmp_path
            )

        key = PrivateKey.generate()
        monkeypatch.setattr(sealing, "sealing_public_key", lambda _s, _g: bytes(key.public_key))
        plan = sealing.disposition(session, sealed.id, "redteam")
        assert plan.action == "seal" and plan.public_key == bytes(key.public_key)
        item = sealing.dispose(
            session, plan, kind="redteam_transcript", ref="rts_z", name="t", data=SECRET, home=tmp_path
        )
        assert item is not None and SealedBox(key).decrypt(sealing.ciphertext(item, tmp_path)) == SECRET

        # A key that is no X25519 key: nothing sealed, nothing readable kept, the reason in the ledger.
        bad = sealing.Disposition("seal", "interp", plan.grant, b"short")
        assert sealing.dispose(session, bad, kind="interp_logs", ref="ijob_w", name="logs", data=SECRET) is None
        assert "sealing failed" in _events(session, "sealed.dropped")[-1]["reason"]
    assert all(SECRET not in p.read_bytes() for p in (tmp_path / "sealed").iterdir())
