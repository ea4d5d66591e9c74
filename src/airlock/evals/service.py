"""Result intake: register evaluator signing keys, verify and store attested results."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from airlock.access.acceptance import require_acceptance
from airlock.access.models import Evaluator, Grant
from airlock.access.seal import check_grant
from airlock.access.service import Principal
from airlock.errors import ConflictError, InvalidRequestError, NotFoundError, PermissionDeniedError
from airlock.evals import events as evals_events
from airlock.evals.attestation import SCHEMA, fingerprint, parse_public_key, verify
from airlock.evals.elicitation import DEFAULT_ALPHA, DEFAULT_FEW_SHOT_MIN_GAIN, Observation, analyse, observation_of
from airlock.evals.models import EvalResult, SigningKey
from airlock.evals.schemas import Attestation, ResultEnvelope
from airlock.ids import parse_version_ref
from airlock.registry.models import Model, ModelVersion
from airlock.registry.service import format_validation_error, get_model, get_version


def register_signing_key(session: Session, evaluator_id: str, public_b64: str, *, registered_by: str) -> SigningKey:
    """Register a public key for an evaluator (idempotent for the same evaluator)."""
    parse_public_key(public_b64)
    fp = fingerprint(public_b64)
    existing = session.scalar(select(SigningKey).where(SigningKey.fingerprint == fp))
    if existing is not None:
        if existing.evaluator_id != evaluator_id:
            raise ConflictError("this public key is registered to another evaluator")
        if existing.revoked_at is not None:
            raise ConflictError("this public key was revoked; generate a new one")
        return existing
    row = SigningKey(evaluator_id=evaluator_id, public_key=public_b64, fingerprint=fp, registered_by=registered_by)
    session.add(row)
    session.flush()
    return row


def find_signing_key(session: Session, key_fingerprint: str) -> SigningKey | None:
    """Return the signing key registered under ``key_fingerprint`` (any evaluator, revoked or not), or None."""
    return session.scalar(select(SigningKey).where(SigningKey.fingerprint == key_fingerprint))


def submit_result(session: Session, principal: Principal, envelope: ResultEnvelope) -> EvalResult:
    """Verify an attested result and store it; every failed check refuses it with a clear error."""
    # 1. The key must be registered to the caller's organisation and not revoked.
    fp = fingerprint(envelope.public_key) if _is_b64(envelope.public_key) else ""
    key = session.scalar(select(SigningKey).where(SigningKey.fingerprint == fp)) if fp else None
    if key is None or key.evaluator_id != principal.evaluator_id:
        raise PermissionDeniedError(
            "the signing key is not registered to your organisation (run `airlock evaluator keygen --register`)",
            code="unknown_signing_key",
        )
    if key.revoked_at is not None:
        raise PermissionDeniedError("the signing key has been revoked", code="signing_key_revoked")
    # 2. The signature must cover exactly this attestation (canonical JSON).
    if not verify(envelope.attestation, envelope.signature, key.public_key):
        raise InvalidRequestError(
            "the signature does not match the attestation: it was altered or signed with another key",
            code="invalid_signature",
        )
    # 3. The attestation must be complete and well-formed.
    try:
        att = Attestation.model_validate(envelope.attestation)
    except ValidationError as exc:
        raise InvalidRequestError(
            f"invalid attestation: {format_validation_error(exc)}", code="invalid_attestation"
        ) from None
    if att.schema_ != SCHEMA:
        raise InvalidRequestError(f"unsupported attestation schema {att.schema_!r}; expected {SCHEMA!r}")
    evaluator = session.get(Evaluator, principal.evaluator_id)
    assert evaluator is not None
    if att.evaluator != evaluator.name:
        raise PermissionDeniedError("the attestation names another evaluator", code="evaluator_mismatch")
    # 4. The grant must be the caller's organisation's, and must have covered that version and variant.
    grant = session.get(Grant, att.grant_id)
    if grant is None or grant.evaluator_id != principal.evaluator_id:
        raise PermissionDeniedError("the attestation's grant is not one of your organisation's", code="grant_mismatch")
    check_grant(session, grant)  # what it covered is read from the row: it must be the row the lab sealed
    # The lab keeps what is submitted under retention_evals: only once the evaluator agreed to that.
    require_acceptance(session, grant, "retention_evals")
    model = session.scalar(select(Model).where(Model.name == att.model))
    version = (
        session.scalar(
            select(ModelVersion).where(ModelVersion.model_id == model.id, ModelVersion.content_hash == att.version_hash)
        )
        if model is not None
        else None
    )
    if model is None or version is None:
        raise NotFoundError(f"no registered version of {att.model!r} has hash {att.version_hash[:12]}…")
    if model.id != grant.model_id or version.id not in grant.version_ids or att.variant not in grant.variants:
        raise PermissionDeniedError(
            f"grant {grant.id} did not cover {att.model}@{version.label}/{att.variant}", code="not_covered_by_grant"
        )
    # 5. A result (one log) is accepted once, however often it is re-signed.
    duplicate = session.scalar(
        select(EvalResult.id).where(
            (EvalResult.signature == envelope.signature)
            | ((EvalResult.evaluator_id == principal.evaluator_id) & (EvalResult.log_sha256 == att.log_sha256))
        )
    )
    if duplicate is not None:
        raise ConflictError(f"this result was already submitted as {duplicate}")
    fine_tuned = bool(att.elicitation.get("fine_tuned"))
    row = EvalResult(
        evaluator_id=principal.evaluator_id,
        grant_id=grant.id,
        model_id=model.id,
        version_id=version.id,
        variant=att.variant,
        suite=att.suite,
        task=att.task,
        dataset_hash=att.dataset_hash,
        samples=att.samples,
        metrics={k: v.model_dump() for k, v in att.metrics.items()},
        elicitation=att.elicitation,
        fine_tuned=fine_tuned,
        log_sha256=att.log_sha256,
        attestation=envelope.attestation,
        signature=envelope.signature,
        key_fingerprint=key.fingerprint,
    )
    session.add(row)
    session.flush()
    evals_events.eval_attested(session, row, grant)
    return row


def verify_stored(session: Session, result: EvalResult) -> bool:
    """Re-check a stored result's signature against its (still unrevoked) registered key."""
    key = session.scalar(select(SigningKey).where(SigningKey.fingerprint == result.key_fingerprint))
    if key is None or key.revoked_at is not None or key.evaluator_id != result.evaluator_id:
        return False
    return verify(result.attestation, result.signature, key.public_key)


def list_results(session: Session, *, evaluator_id: str | None = None, **filters: Any) -> list[EvalResult]:
    """Return results, newest first, optionally for one evaluator and matching column filters."""
    stmt = select(EvalResult).order_by(EvalResult.created_at.desc())
    if evaluator_id:
        stmt = stmt.where(EvalResult.evaluator_id == evaluator_id)
    for column, value in filters.items():
        if value is not None:
            stmt = stmt.where(getattr(EvalResult, column) == value)
    return list(session.scalars(stmt))


def elicitation_report(
    session: Session,
    model_version: str,
    task: str,
    *,
    evaluator_id: str | None = None,
    metric: str = "mean_score",
    alpha: float = DEFAULT_ALPHA,
    few_shot_min_gain: float = DEFAULT_FEW_SHOT_MIN_GAIN,
) -> dict[str, Any]:
    """Gather the verified results of ``task`` on ``model@version`` by elicitation level and run the checks.

    ``evaluator_id`` limits the report to one organisation's results (what an evaluator may see);
    results whose signature no longer verifies, or whose row disagrees with the signed
    attestation, are listed as ignored and take no part.
    """
    ref = parse_version_ref(model_version, require_version=True)
    model = get_model(session, ref.model)
    version = get_version(session, model, ref.version)
    rows = list_results(session, evaluator_id=evaluator_id, version_id=version.id, task=task)
    observations: list[Observation] = []
    ignored: list[dict[str, str]] = []
    for row in sorted(rows, key=lambda r: (r.created_at, r.id)):
        att = row.attestation
        if not verify_stored(session, row):
            ignored.append({"result_id": row.id, "reason": "signature does not verify against a registered key"})
            continue
        if (att.get("task"), att.get("variant"), att.get("version_hash")) != (
            row.task,
            row.variant,
            version.content_hash,
        ):
            ignored.append({"result_id": row.id, "reason": "the stored row disagrees with its signed attestation"})
            continue
        obs, why = observation_of(row.id, att, metric)
        if obs is None:
            ignored.append({"result_id": row.id, "reason": why or "unusable"})
            continue
        observations.append(obs)
    report = analyse(observations, alpha=alpha, few_shot_min_gain=few_shot_min_gain)
    return {
        "model": model.name,
        "version": version.label,
        "version_hash": version.content_hash,
        "task": task,
        "metric": metric,
        **report,
        "ignored_results": ignored,
    }


def _is_b64(value: str) -> bool:
    try:
        parse_public_key(value)
    except InvalidRequestError:
        return False
    return True
