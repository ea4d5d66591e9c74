"""Contamination's ledger events: who registered how many items, who checked what, how many matched; never content.

Public: a registration's organisation, grant, item and shingle counts, scheme and the digest of the
uploaded fingerprint (so the evaluator can prove what it registered); a check's actor and role,
the registrations it used, the documents it scanned, how many matched, and per registration how
many items were found. No test item, shingle hash, salt or corpus text is ever in the ledger.
"""

from __future__ import annotations

from collections import Counter

from sqlalchemy.orm import Session

from airlock.access.models import Evaluator
from airlock.contamination.models import ContaminationCheck, ContaminationHit, ContaminationRegistration
from airlock.ledger import service as ledger

__all__ = ["check_completed", "check_opened", "registered", "withdrawn"]


def _evaluator(session: Session, evaluator_id: str) -> str:
    evaluator = session.get(Evaluator, evaluator_id)
    return evaluator.name if evaluator else evaluator_id


def registered(session: Session, row: ContaminationRegistration) -> None:
    """Log ``contamination.registered``: counts, scheme and digest of a fingerprinted test set."""
    body = {
        "registration": row.id,
        "evaluator": _evaluator(session, row.evaluator_id),
        "grant": row.grant_id,
        "items": row.item_count,
        "shingles": row.shingle_count,
        "scheme": {"ngram": row.ngram, "threshold": row.threshold, "min_shingles": row.min_shingles},
        "digest": row.digest,
    }
    ledger.record_event(session, "contamination.registered", body, confidential={"name": row.name})


def withdrawn(session: Session, row: ContaminationRegistration) -> None:
    """Log ``contamination.withdrawn``: the registration no longer takes part in checks."""
    body = {"registration": row.id, "evaluator": _evaluator(session, row.evaluator_id), "grant": row.grant_id}
    ledger.record_event(session, "contamination.withdrawn", body)


def check_opened(session: Session, row: ContaminationCheck) -> None:
    """Log ``contamination.check``: who received which registrations' fingerprints to check a corpus."""
    body = {"check": row.id, "actor": row.actor, "role": row.role, "registrations": list(row.registrations)}
    ledger.record_event(session, "contamination.check", body, confidential={"corpus": row.corpus})


def check_completed(session: Session, row: ContaminationCheck, hits: list[ContaminationHit]) -> None:
    """Log ``contamination.result``: documents scanned and matched, items found per registration."""
    found = Counter(hit.registration_id for hit in hits)
    body = {
        "check": row.id,
        "documents": row.documents,
        "matched_documents": row.matched_documents,
        "corpus_digest": row.corpus_digest,
        "items_found": {rid: found.get(rid, 0) for rid in row.registrations},
    }
    ledger.record_event(session, "contamination.result", body)
