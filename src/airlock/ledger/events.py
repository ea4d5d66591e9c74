"""What the lab's services log, built from their rows: one call per change, in the change's transaction.

Public by design (the issue names them): evaluator identity, model, version labels and content
hashes, variants, scopes, the access window, mitigation names/kinds/stances, stage changes and
attested-result hashes. Committed (salted SHA-256, revealable later): grant quotas and notes, who
issued or revoked a grant and why, a grant's full terms, mitigation configs (prompts, filter
patterns), stage-change actors, and metrics of results still under a publication embargo.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from airlock.ledger._entry import canonical
from airlock.ledger.service import record_event

if TYPE_CHECKING:
    from airlock.access.models import Grant
    from airlock.evals.models import EvalResult
    from airlock.registry.models import ModelVersion, Variant


def version_ref(version: ModelVersion) -> dict[str, Any]:
    """Return the public identity of a model version: model name, label and content hash."""
    return {"model": version.model.name, "label": version.label, "hash": version.content_hash}


def _grant_versions(session: Session, grant: Grant) -> list[dict[str, Any]]:
    from airlock.registry.models import ModelVersion

    versions = [session.get(ModelVersion, vid) for vid in grant.version_ids]
    return [version_ref(v) for v in versions if v is not None]


def _grant_ref(session: Session, grant: Grant) -> dict[str, Any]:
    """Name a grant publicly: its id, its evaluator's name and its model's name."""
    from airlock.access.models import Evaluator
    from airlock.registry.models import Model

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
    from airlock.access.seal import issued_terms

    body = {
        **_grant_ref(session, grant),
        "versions": _grant_versions(session, grant),
        "variants": list(grant.variants),
        "scopes": list(grant.scopes),
        "not_before": grant.not_before,
        "not_after": grant.not_after,
        "embargo_days": grant.embargo_days,
        # A capability, like a scope: whether interp may return full-vocabulary logits.
        "interp_full_logits": bool(grant.interp_full_logits),
    }
    quotas = {
        "requests_per_minute": grant.quota_requests_per_minute,
        "total_tokens": grant.quota_total_tokens,
        "finetune_jobs": grant.quota_finetune_jobs,
        "trained_tokens": grant.quota_trained_tokens,
        "file_bytes": grant.quota_file_bytes,
        "interp_cpu_seconds": grant.quota_interp_cpu_seconds,
        "result_bytes": grant.quota_result_bytes,
        "interp_served_bytes": grant.quota_interp_served_bytes,
        "interp_review_served_bytes": grant.interp_review_served_bytes,
    }
    # Every term column (the ones the grant seal covers, bar revocation), so any later column is logged too.
    terms = issued_terms(grant)
    return body, {"quotas": quotas, "notes": grant.notes, "issued_by": grant.created_by, "terms": terms}


def grant_issued(session: Session, grant: Grant) -> None:
    """Log ``grant.issued``: who may do what to which versions and variants, and when."""
    body, confidential = grant_issued_event(session, grant)
    record_event(session, "grant.issued", body, confidential=confidential)


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
    record_event(session, "grant.revoked", body, confidential=confidential)


def variant_registered(session: Session, version: ModelVersion, variant: Variant, *, updated: bool = False) -> None:
    """Log ``variant.registered`` with its mitigations and their stances (configs committed)."""
    mitigations = sorted(variant.mitigations, key=lambda m: m.position)
    body = {
        "version": version_ref(version),
        "variant": variant.name,
        "backend": variant.backend,
        "updated": updated,
        "mitigations": [
            {"position": m.position, "name": m.name, "kind": m.kind, "stance": m.stance} for m in mitigations
        ],
    }
    configs = {f"mitigation.{m.position}.config": m.config for m in mitigations}
    record_event(session, "variant.registered", body, confidential=configs or None)


def stage_changed(session: Session, version: ModelVersion, from_stage: str | None, to_stage: str, actor: str) -> None:
    """Log ``stage.changed`` (e.g. to ``deployed``, which the verifier's deployment question keys on)."""
    body = {"version": version_ref(version), "from": from_stage, "to": to_stage}
    record_event(session, "stage.changed", body, confidential={"actor": actor})


def eval_attested(session: Session, result: EvalResult, grant: Grant) -> None:
    """Log ``eval.attested``: hashes always; metrics in the clear only when no embargo applies."""
    from airlock.access.models import Evaluator
    from airlock.registry.models import ModelVersion

    evaluator = session.get(Evaluator, result.evaluator_id)
    version = session.get(ModelVersion, result.version_id)
    embargoed = bool(grant.embargo_days)
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
        "attestation_sha256": hashlib.sha256(canonical(result.attestation).encode()).hexdigest(),
        "signature_sha256": hashlib.sha256(result.signature.encode()).hexdigest(),
        "key_fingerprint": result.key_fingerprint,
        "embargoed": embargoed,
    }
    if not embargoed:
        body["metrics"] = result.metrics
    record_event(session, "eval.attested", body, confidential={"metrics": result.metrics} if embargoed else None)
