"""Access's ledger events: grants issued, accepted and revoked, public terms in the clear and the rest committed.

Public by design: evaluator identity, model, version labels and content hashes, variants, scopes,
the access window. Committed (salted SHA-256, revealable later): quotas and notes, who issued or
revoked a grant and why, and a grant's full terms. One function builds each event for both
sides: the service logs what it returns, and the lab-side check recomputes it from the live row.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from airlock.access.models import Evaluator, Grant
from airlock.access.terms import issued_terms, ledger_terms
from airlock.ledger import service as ledger
from airlock.registry.events import version_ref
from airlock.registry.models import Model, ModelVersion

__all__ = ["grant_accepted", "grant_issued", "grant_issued_event", "grant_revoked", "grant_revoked_event"]


def _grant_versions(session: Session, grant: Grant) -> list[dict[str, Any]]:
    versions = [session.get(ModelVersion, vid) for vid in grant.version_ids]
    return [version_ref(v) for v in versions if v is not None]


def _grant_ref(session: Session, grant: Grant) -> dict[str, Any]:
    """Name a grant publicly: its id, its evaluator's name and its model's name."""
    evaluator = session.get(Evaluator, grant.evaluator_id)
    model = session.get(Model, grant.model_id)
    return {
        "grant": grant.id,
        "evaluator": evaluator.name if evaluator else grant.evaluator_id,
        "model": model.name if model else grant.model_id,
    }


def grant_issued_event(session: Session, grant: Grant) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return the public body and the confidential fields ``grant.issued`` logs for ``grant``.

    One function for both sides: the service logs what it returns, and the lab-side check
    recomputes it from the live row to compare with what was logged.
    """
    body = {
        **_grant_ref(session, grant),
        "versions": _grant_versions(session, grant),
        "variants": list(grant.variants),
        "scopes": list(grant.scopes),
        "not_before": grant.not_before,
        "not_after": grant.not_after,
    }
    # The terms each capability publishes (embargo, full logits, watermarking), and the quotas it commits to.
    public, quotas = ledger_terms(grant)
    body.update(public)
    # Every term column (the ones the grant seal covers, bar revocation), so any later column is logged too.
    terms = issued_terms(grant)
    return body, {"quotas": quotas, "notes": grant.notes, "issued_by": grant.created_by, "terms": terms}


def grant_issued(session: Session, grant: Grant) -> None:
    """Log ``grant.issued``: who may do what to which versions and variants, and when."""
    body, confidential = grant_issued_event(session, grant)
    ledger.record_event(session, "grant.issued", body, confidential=confidential)


def grant_revoked_event(session: Session, grant: Grant) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return the public body and the confidential fields ``grant.revoked`` logs for ``grant``."""
    body = {
        **_grant_ref(session, grant),
        "revoked_at": grant.revoked_at,
    }
    return body, {"reason": grant.revoked_reason or ""}


def grant_revoked(session: Session, grant: Grant) -> None:
    """Log ``grant.revoked`` (the reason is committed, not published)."""
    body, confidential = grant_revoked_event(session, grant)
    ledger.record_event(session, "grant.revoked", body, confidential=confidential)


def grant_accepted(session: Session, grant: Grant, signed: dict[str, Any]) -> None:
    """Log ``grant.accepted``: the signed acceptance document, its signature and the key, all public.

    Everything a verifier needs is in the clear: the document's fields, the Ed25519 public key and
    its fingerprint, and the signature, so the acceptance re-verifies offline.
    """
    body = {**_grant_ref(session, grant), **{k: v for k, v in signed.items() if k != "grant_id"}}
    ledger.record_event(session, "grant.accepted", body)
