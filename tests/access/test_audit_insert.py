"""Audit rows are stored the same whichever way a batch is inserted (COPY on PostgreSQL, INSERT elsewhere)."""

from __future__ import annotations

from typing import Any, cast

from sqlalchemy import Table, insert, select

from airlock.access.audit import AuditRecord, insert_audit_rows
from airlock.access.models import AuditEvent
from airlock.db import utcnow


def test_batched_rows_read_back_as_a_plain_insert_stores_them(db: Any) -> None:
    record = AuditRecord(
        request_id="req_1",
        method="POST",
        path="/v1/chat/completions",
        status_code=200,
        outcome="blocked",
        actor_type="evaluator",
        actor='tab\there, newline\nthere, backslash\\, quote"',
        grant_id="g1",
        tokens_in=5,
        tokens_out=1,
        latency_ms=0.125,
        detail={"mitigations": [{"name": "filter", "reason": 'é\\\n"', "blocked": True}], "none": None},
        ts=utcnow(),
    )
    row = {name: getattr(record, name) for name in AuditRecord.__dataclass_fields__}
    with db.session() as session:
        insert_audit_rows(session, [dict(row), dict(row)])
        session.execute(insert(cast(Table, AuditEvent.__table__)), [dict(row)])
    with db.session() as session:
        stored = list(session.scalars(select(AuditEvent).order_by(AuditEvent.id)))
        columns = [c.name for c in AuditEvent.__table__.columns if c.name != "id"]
        values = [tuple(getattr(event, c) for c in columns) for event in stored]
    assert len(values) == 3 and values[0] == values[1] == values[2]
    assert stored[0].id < stored[1].id < stored[2].id
    assert stored[0].detail == record.detail and stored[0].ts == record.ts and stored[0].actor == record.actor
