"""Red-teaming's ledger events: counts, severities, hours and variants in the clear; titles and content committed.

Public: which grant and organisation red-teamed which version and variant, for how many active
hours, and how many findings of each severity; a finding's category and severity; each triage's
outcome. Committed (salted SHA-256, revealable later by the lab): finding titles and notes, the
flagged turn, a session's whole transcript, and the reasons given in triage.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from airlock.access.models import Evaluator
from airlock.canonical import canonical_bytes
from airlock.ledger import service as ledger
from airlock.redteam.models import RedteamFinding, RedteamSession, RedteamTurn
from airlock.registry.events import version_ref
from airlock.registry.models import ModelVersion

__all__ = ["SEVERITY_ORDER", "finding_flagged", "finding_triaged", "session_closed"]

SEVERITY_ORDER = ("low", "medium", "high", "critical")


def _version(session: Session, version_id: str | None) -> dict[str, Any] | None:
    version = session.get(ModelVersion, version_id) if version_id else None
    return version_ref(version) if version is not None else None


def _evaluator(session: Session, evaluator_id: str) -> str:
    evaluator = session.get(Evaluator, evaluator_id)
    return evaluator.name if evaluator else evaluator_id


def session_closed(session: Session, row: RedteamSession, *, keep_content: bool = True) -> None:
    """Log ``redteam.session``: hours, turns and findings by severity (the transcript committed).

    A grant that keeps no transcripts commits to the transcript's SHA-256 instead: a commitment's
    opening (the value itself) is stored, so committing the words would keep them.
    """
    turns = list(
        session.scalars(select(RedteamTurn).where(RedteamTurn.session_id == row.id).order_by(RedteamTurn.index))
    )
    findings = Counter(
        session.scalars(select(RedteamFinding.severity).where(RedteamFinding.session_id == row.id)).all()
    )
    body = {
        "session": row.id,
        "grant": row.grant_id,
        "evaluator": _evaluator(session, row.evaluator_id),
        "version": _version(session, row.version_id),
        "variants": list(row.variants),
        "turns": row.turns,
        "hours": round(row.active_seconds / 3600, 3),
        "findings": {s: findings.get(s, 0) for s in SEVERITY_ORDER},
    }
    transcript: Any = [{"index": t.index, "prompt": t.prompt, "responses": t.responses} for t in turns]
    if not keep_content:
        transcript = {"sha256": hashlib.sha256(canonical_bytes(transcript)).hexdigest()}
    ledger.record_event(session, "redteam.session", body, confidential={"title": row.title, "transcript": transcript})


def finding_flagged(session: Session, finding: RedteamFinding, turn: RedteamTurn) -> None:
    """Log ``redteam.finding``: its category and severity against a version's variant (title, notes, turn committed)."""
    body = {
        "finding": finding.id,
        "session": finding.session_id,
        "grant": finding.grant_id,
        "evaluator": _evaluator(session, finding.evaluator_id),
        "version": _version(session, finding.version_id),
        "variant": finding.variant,
        "category": finding.category,
        "severity": finding.severity,
    }
    response = next((r for r in turn.responses if r.get("variant") == finding.variant), {})
    flagged = {"prompt": turn.prompt, "response": response.get("content", "")}
    ledger.record_event(
        session,
        "redteam.finding",
        body,
        confidential={"title": finding.title, "notes": finding.notes, "turn": flagged},
    )


def finding_triaged(session: Session, finding: RedteamFinding, role: str) -> None:
    """Log ``redteam.triage``: the new status (and the fixing version) in the clear, the reason committed."""
    body = {
        "finding": finding.id,
        "version": _version(session, finding.version_id),
        "variant": finding.variant,
        "severity": finding.severity,
        "status": finding.status,
        "fixed_in": _version(session, finding.fixed_in_version_id),
        "role": role,
    }
    ledger.record_event(
        session,
        "redteam.triage",
        body,
        confidential={"reason": finding.triage_reason, "triaged_by": finding.triaged_by or ""},
    )
