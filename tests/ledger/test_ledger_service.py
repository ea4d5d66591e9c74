"""Ledger service on SQLite and PostgreSQL: recording, sequencing, proofs, checkpoints, reveals, hooks."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import func, select

from airlock.access.audit import AUDIT_DIGEST
from airlock.db import Database
from airlock.errors import InvalidRequestError, NotFoundError
from airlock.ledger import service
from airlock.ledger._entry import verify_opening
from airlock.ledger._merkle import MemoryTree, leaf_hash, verify_consistency, verify_inclusion
from airlock.ledger._note import Signer, verify_checkpoint
from airlock.ledger.models import LedgerCommitment, LedgerEntry, LedgerPending
from tests.conftest import FAKE_MANIFEST, grant_request


def _signer() -> Signer:
    return Signer("test.example/ledger", Ed25519PrivateKey.generate())


def _entries(db: Database) -> list[dict[str, Any]]:
    with db.session() as session:
        rows = session.scalars(select(LedgerEntry.entry).order_by(LedgerEntry.idx))
        return [json.loads(r) for r in rows]


def _record(db: Database, n: int, start: int = 0) -> None:
    with db.session() as session:
        for i in range(start, start + n):
            service.record_event(session, "test.event", {"i": i})


def test_record_is_pending_until_sequenced_and_atomic_with_caller(db: Database) -> None:
    """An event joins the caller's transaction: rolled back with it, integrated only by the sequencer."""
    with pytest.raises(RuntimeError), db.session() as session:
        service.record_event(session, "test.event", {"i": -1})
        raise RuntimeError("the change being recorded failed")
    _record(db, 3)
    with db.session() as session:
        assert service.pending_count(session) == 3
        assert service.tree_head(session).size == 0
    assert service.sequence(db) == 3
    entries = _entries(db)
    assert [e["body"]["i"] for e in entries] == [0, 1, 2]
    assert all(e["kind"] == "test.event" and e["time"].endswith("Z") and e["v"] == 2 for e in entries)
    with db.session() as session:
        assert service.pending_count(session) == 0


def test_proofs_match_a_reference_tree(db: Database) -> None:
    """Roots and proofs read from stored nodes equal an in-memory tree's, across several batches."""
    for n in (1, 6, 13, 37):
        _record(db, n)
        service.sequence(db, batch_size=7)
    with db.session() as session:
        texts = list(session.scalars(select(LedgerEntry.entry).order_by(LedgerEntry.idx)))
        tree = MemoryTree()
        for t in texts:
            tree.append(leaf_hash(t.encode()))
        head = service.tree_head(session)
        assert head.size == 57 and head.root == tree.root()
        for size in (1, 2, 7, 8, 9, 31, 57):
            root = service.root_at(session, size)
            assert root == tree.root(size)
            for index in {0, size // 2, size - 1}:
                p = service.inclusion_proof(session, index, size)
                assert p.proof == tree.inclusion_proof(index, size)
                verify_inclusion(p.leaf_hash, index, size, p.proof, root)
            for old in {1, size // 3 or 1, size}:
                proof = service.consistency_proof(session, old, size)
                verify_consistency(old, size, proof, tree.root(old), root)


def test_bad_proof_requests_are_invalid(db: Database) -> None:
    """Index >= size, size > tree, old > new and old = 0 are clean 400s."""
    _record(db, 4)
    service.sequence(db)
    with db.session() as session:
        for call in (
            lambda: service.inclusion_proof(session, 4, 4),
            lambda: service.inclusion_proof(session, 0, 5),
            lambda: service.consistency_proof(session, 3, 2),
            lambda: service.consistency_proof(session, 0, 2),
            lambda: service.consistency_proof(session, 1, 9),
            lambda: service.get_entries(session, 4, 8),
        ):
            with pytest.raises(InvalidRequestError):
                call()


def test_concurrent_sequencers_never_fork_the_log(db: Database) -> None:
    """Several sequencers racing (as in several replicas) integrate each event exactly once."""
    errors: list[BaseException] = []

    def writer(k: int) -> None:
        try:
            for b in range(5):
                _record(db, 10, start=k * 1000 + b * 10)
                service.sequence(db, batch_size=4)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    service.sequence(db)
    bodies = sorted(e["body"]["i"] for e in _entries(db))
    assert bodies == sorted(k * 1000 + i for k in range(4) for i in range(50))
    assert service.check_database(db, _signer(), audit=AUDIT_DIGEST) == []


def test_checkpoints_are_signed_consistent_and_not_duplicated(db: Database) -> None:
    """A checkpoint covers pending events; an unchanged tree reuses the newest checkpoint unless forced."""
    signer = _signer()
    _record(db, 5)
    first = service.publish_checkpoint(db, signer)
    assert verify_checkpoint(first.note, signer.verifier, signer.name).size == 5
    assert service.publish_checkpoint(db, signer).id == first.id
    assert service.publish_checkpoint(db, signer, force=True).id != first.id
    _record(db, 6)
    second = service.publish_checkpoint(db, signer)
    a = verify_checkpoint(first.note, signer.verifier)
    b = verify_checkpoint(second.note, signer.verifier)
    with db.session() as session:
        verify_consistency(a.size, b.size, service.consistency_proof(session, a.size, b.size), a.root, b.root)


def test_confidential_fields_are_commitments_revealable_later(db: Database) -> None:
    """Confidential values never appear in the entry; reveal opens them and logs the opening."""
    with db.session() as session:
        service.record_event(session, "grant.issued", {"grant": "g1"}, confidential={"notes": "secret plan"})
    service.sequence(db)
    entry = _entries(db)[0]
    assert "secret plan" not in json.dumps(entry)
    commitment = entry["commitments"]["notes"]
    with db.session() as session:
        (opening,) = service.reveal(session, entry["id"])
    assert opening.value == "secret plan"
    assert verify_opening(commitment, opening.salt, "secret plan")
    assert not verify_opening(commitment, opening.salt, "another plan")
    service.sequence(db)
    revealed = _entries(db)[-1]
    assert revealed["kind"] == "commitment.revealed" and revealed["body"]["event"] == entry["id"]
    with db.session() as session, pytest.raises(NotFoundError):
        service.reveal(session, "lev_missing")


def test_services_log_grants_variants_stages_and_audit_digests(db: Database) -> None:
    """Manifest sync, grants, revocation, stage changes and the audit digest each leave their entry."""
    from datetime import timedelta

    from airlock.access import service as access
    from airlock.access.models import AuditEvent
    from airlock.db import utcnow
    from airlock.registry import service as registry
    from airlock.registry.models import ModelVersion

    with db.session() as session:
        registry.sync_manifest(session, registry.parse_manifest(FAKE_MANIFEST))
        access.create_evaluator(session, "org-a")
        grant = access.create_grant(
            session,
            grant_request(
                evaluator="org-a",
                model="m1",
                variants=["production"],
                scopes=["sample"],
                notes="n",
                quota_total_tokens=9,
            ),
        )
        access.revoke_grant(session, grant.id, "done")
        version = session.scalar(select(ModelVersion).where(ModelVersion.label == "v1"))
        assert version is not None
        registry.set_stage(session, version, "deployed", actor="alice")
        for i in range(3):
            session.add(
                AuditEvent(
                    ts=utcnow() - timedelta(minutes=1),
                    request_id=f"r{i}",
                    actor_type="anonymous",
                    method="GET",
                    path="/x",
                    status_code=200,
                    outcome="allowed",
                )
            )
    assert service.digest_audit(db, AUDIT_DIGEST) == 1
    assert service.digest_audit(db, AUDIT_DIGEST) == 0
    service.sequence(db)
    entries = _entries(db)
    kinds = [e["kind"] for e in entries]
    assert kinds.count("variant.registered") == 4 and kinds.count("stage.changed") == 3
    issued = next(e for e in entries if e["kind"] == "grant.issued")
    assert issued["body"]["evaluator"] == "org-a" and issued["body"]["scopes"] == ["sample"]
    assert issued["body"]["versions"] == [{"model": "m1", "label": "v1", "hash": "a" * 64}]
    assert set(issued["commitments"]) == {"quotas", "notes", "issued_by", "terms"}
    production = next(e for e in entries if e["kind"] == "variant.registered" and e["body"]["variant"] == "production")
    assert [m["stance"] for m in production["body"]["mitigations"]] == ["disabled_for_eval", "claimed", "claimed"]
    assert "be safe" not in json.dumps(production)
    deployed = [e for e in entries if e["kind"] == "stage.changed" and e["body"]["to"] == "deployed"]
    assert deployed[0]["body"]["version"]["hash"] == "a" * 64
    assert "grant.revoked" in kinds
    digest = next(e for e in entries if e["kind"] == "audit.digest")
    assert digest["body"]["count"] == 3
    with db.session() as session:
        assert session.scalar(select(func.count()).select_from(LedgerCommitment)) > 0
        assert session.scalar(select(func.count()).select_from(LedgerPending)) == 0
    assert service.check_database(db, _signer(), audit=AUDIT_DIGEST) == []


def test_verifier_flags_a_reveal_that_does_not_open_its_commitment(tmp_path: Any) -> None:
    """A lab publishing a wrong opening is caught offline (SQLite only: no database behaviour involved)."""
    from airlock.ledger.verify import verify_bundle

    db = Database(f"sqlite:///{tmp_path / 'reveal.db'}")
    db.migrate()
    signer = _signer()
    with db.session() as session:
        service.record_event(session, "grant.issued", {"grant": "g1"}, confidential={"notes": "true notes"})
    service.sequence(db)
    event_id = _entries(db)[0]["id"]
    with db.session() as session:
        (opening,) = service.reveal(session, event_id)
    assert verify_bundle(service.export_bundle(db, signer), signer.verifier.vkey()).ok
    with db.session() as session:
        openings = [{"field": "notes", "salt": opening.salt, "value": "doctored notes"}]
        service.record_event(session, "commitment.revealed", {"event": event_id, "openings": openings})
    report = verify_bundle(service.export_bundle(db, signer), signer.verifier.vkey())
    assert [p for p in report.problems if "does not open" in p]
    db.dispose()


class _EchoHandler:
    """A job kind with no record of its own: succeeds at once with a training-like summary."""

    resumable = False

    def run(self, ctx: Any) -> dict[str, Any]:
        return {"trained_tokens": 1234, "steps": 7}


class _TrainHandler(_EchoHandler):
    """A stand-in fine-tuning handler: the real handler's ledger event, without the training or its files."""

    def on_finished(self, session: Any, job: Any) -> None:
        from airlock.finetune import events

        events.job_finished(session, job)


def test_finetune_job_outcome_is_logged_other_kinds_are_not(db: Database) -> None:
    """A job's terminal transition runs its handler's hook: ``finetune.job`` for fine-tuning jobs only."""
    import time

    from airlock.finetune.jobs import KIND
    from airlock.jobs import service as jobs
    from airlock.jobs.runner import JobRunner

    with db.session() as session:
        ft = jobs.enqueue(session, KIND, evaluator_id="evalr_x", grant_id="grant_x", params={"model": "m1/base"}).id
        other = jobs.enqueue(session, "echo", evaluator_id="evalr_x", grant_id="grant_x", params={}).id
    runner = JobRunner(db, {KIND: _TrainHandler(), "echo": _EchoHandler()}, poll_interval=0.02)
    runner.start()
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with db.session() as session:
                if all(jobs.get_job(session, j).status == "succeeded" for j in (ft, other)):
                    break
            time.sleep(0.05)
    finally:
        runner.stop(timeout=10)
    service.sequence(db)
    logged = [e for e in _entries(db) if e["kind"] == "finetune.job"]
    assert [e["body"]["job"] for e in logged] == [ft]
    assert logged[0]["body"]["status"] == "succeeded" and logged[0]["body"]["trained_tokens"] == 1234
