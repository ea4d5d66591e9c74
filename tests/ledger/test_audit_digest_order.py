"""Audit digests with several writers: a batch that draws its ids first also commits first, so no row is skipped."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import func, select

from airlock.access.audit import AUDIT_DIGEST, AuditRecord, insert_audit_rows
from airlock.access.models import AuditEvent
from airlock.config import get_settings
from airlock.db import Database
from airlock.ledger import service
from airlock.ledger.service import get_signer


def _row(request_id: str) -> dict[str, object]:
    from dataclasses import asdict

    return asdict(AuditRecord(request_id=request_id, method="GET", path="/x", status_code=200, outcome="allowed"))


def test_a_batch_committed_late_is_still_digested(db: Database) -> None:
    """Replica A draws ids and commits late; replica B's later batch cannot commit (and be digested) before it."""
    if db.engine.dialect.name != "postgresql":
        pytest.skip("SQLite has one writer at a time: ids always commit in order")
    first = db.sessions()
    insert_audit_rows(first, [_row("req_a")])  # ids drawn, transaction still open
    second_done = threading.Event()

    def second_writer() -> None:
        with db.session() as session:
            insert_audit_rows(session, [_row("req_b")])
        second_done.set()

    thread = threading.Thread(target=second_writer)
    thread.start()
    # Either the second batch waits for the first (the fix), or it commits now and a digest taken
    # now would cover its id and never the first batch's smaller one.
    thread.join(timeout=2.0)
    service.digest_audit(db, AUDIT_DIGEST, lag_s=0)
    first.commit()
    first.close()
    thread.join(timeout=30)
    assert second_done.is_set()
    service.digest_audit(db, AUDIT_DIGEST, lag_s=0)

    with db.session() as session:
        assert session.scalar(select(func.count()).select_from(AuditEvent)) == 2
    signer = get_signer(get_settings())
    assert service.check_database(db, signer, audit=AUDIT_DIGEST) == []
