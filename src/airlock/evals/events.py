"""Evaluations' ledger events: each attested result, its hashes always and its metrics once no embargo applies."""

from __future__ import annotations

import hashlib
from typing import Any

from sqlalchemy.orm import Session

from airlock.access.models import Evaluator, Grant
from airlock.access.terms import terms_of
from airlock.canonical import sha256_hex
from airlock.evals.models import EvalResult
from airlock.evals.terms import PublicationTerms
from airlock.ledger import service as ledger
from airlock.registry.events import version_ref
from airlock.registry.models import ModelVersion

__all__ = ["eval_attested"]


def eval_attested(session: Session, result: EvalResult, grant: Grant) -> None:
    """Log ``eval.attested``: hashes always; metrics in the clear only when no embargo applies."""
    evaluator = session.get(Evaluator, result.evaluator_id)
    version = session.get(ModelVersion, result.version_id)
    embargoed = bool(terms_of(grant, PublicationTerms).embargo_days)
    body: dict[str, Any] = {
        "result": result.id,
        "grant": grant.id,
        "evaluator": evaluator.name if evaluator else result.evaluator_id,
        "version": version_ref(version) if version else {"id": result.version_id},
        "variant": result.variant,
        "suite": result.suite,
        "task": result.task,
        "samples": result.samples,
        "fine_tuned": result.fine_tuned,
        "dataset_sha256": result.dataset_hash,
        "log_sha256": result.log_sha256,
        "attestation_sha256": sha256_hex(result.attestation),
        "signature_sha256": hashlib.sha256(result.signature.encode()).hexdigest(),
        "key_fingerprint": result.key_fingerprint,
        "embargoed": embargoed,
    }
    if not embargoed:
        body["metrics"] = result.metrics
    ledger.record_event(session, "eval.attested", body, confidential={"metrics": result.metrics} if embargoed else None)
