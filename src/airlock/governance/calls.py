"""Public calls for external evaluators (EU GPAI Code of Practice, Appendix 3.5), kept in the ledger.

A call is opened for one model version, receives applications (each judged qualified or not,
with a public reason; the applicant's name is committed, not published) and is closed. All three
are ledger events, so the record a lab shows when no qualified evaluator answered is the public,
tamper-evident one; :func:`calls_for` reads them back (pending or integrated).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy.orm import Session

from airlock.db import new_id, utcnow
from airlock.errors import ConflictError, InvalidRequestError, NotFoundError
from airlock.ledger import service as ledger
from airlock.registry.events import version_ref
from airlock.registry.models import ModelVersion

__all__ = ["Call", "calls_for", "close_call", "open_call", "record_application"]

KINDS = ["call.opened", "call.application", "call.closed"]


@dataclass
class Call:
    """A call for evaluators as the ledger records it."""

    id: str
    version_hash: str
    text: str
    opened_at: datetime
    closed_at: datetime | None = None
    qualified: int = 0
    applications: int = 0
    reasons: list[str] = field(default_factory=list)


def _when(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC)


def calls_for(session: Session, version_hash: str | None = None) -> list[Call]:
    """Return every call (for one version, when given) with its applications and closing, from the ledger."""
    calls: dict[str, Call] = {}
    events = sorted(ledger.logged_events(session, KINDS), key=lambda e: e.time)
    for e in events:
        if e.kind == "call.opened":
            calls[str(e.body["call"])] = Call(
                str(e.body["call"]), str(e.body["version"]["hash"]), str(e.body.get("text", "")), _when(e.time)
            )
    for e in events:
        call = calls.get(str(e.body.get("call")))
        if call is None:
            continue
        if e.kind == "call.application" and call.closed_at is None:
            call.applications += 1
            call.qualified += bool(e.body.get("qualified"))
            call.reasons.append(str(e.body.get("reason", "")))
        elif e.kind == "call.closed" and call.closed_at is None:
            call.closed_at = _when(e.time)
    return [c for c in calls.values() if version_hash is None or c.version_hash == version_hash]


def _get(session: Session, call_id: str) -> Call:
    for call in calls_for(session):
        if call.id == call_id:
            return call
    raise NotFoundError(f"call {call_id!r} does not exist")


def open_call(session: Session, version: ModelVersion, text: str, actor: str) -> str:
    """Open a public call for evaluators of ``version``; return its id."""
    if len(text.strip()) < 20:
        raise InvalidRequestError("a call needs a public text of at least 20 characters", param="text")
    call_id = new_id("call")
    body = {"call": call_id, "version": version_ref(version), "text": text.strip(), "opened_at": utcnow()}
    ledger.record_event(session, "call.opened", body, confidential={"opened_by": actor})
    return call_id


def record_application(
    session: Session, call_id: str, applicant: str, *, qualified: bool, reason: str, actor: str
) -> None:
    """Record one application: qualified or not, and why (public); the applicant's name is committed."""
    call = _get(session, call_id)
    if call.closed_at is not None:
        raise ConflictError(f"call {call_id} is closed")
    if not reason.strip():
        raise InvalidRequestError("an application needs a public reason for its assessment", param="reason")
    body = {"call": call_id, "qualified": qualified, "reason": reason.strip()}
    ledger.record_event(session, "call.application", body, confidential={"applicant": applicant, "assessed_by": actor})


def close_call(session: Session, call_id: str, actor: str) -> Call:
    """Close a call; its counts are published with the closing."""
    call = _get(session, call_id)
    if call.closed_at is not None:
        raise ConflictError(f"call {call_id} is already closed")
    body = {"call": call_id, "applications": call.applications, "qualified": call.qualified, "closed_at": utcnow()}
    ledger.record_event(session, "call.closed", body, confidential={"closed_by": actor})
    call.closed_at = utcnow()
    return call
