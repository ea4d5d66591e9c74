"""Admin routes for evaluators, grants, keys and the audit trail; evaluator and lab routes for sealed items."""

from __future__ import annotations

import base64
import binascii
from datetime import UTC
from typing import Annotated

from fastapi import APIRouter, Query, Response

from airlock.access import acceptance, sealing, service
from airlock.access import audit as audit_service
from airlock.access.models import Grant
from airlock.access.roles import Permission
from airlock.access.schemas import (
    AcceptanceState,
    AuditEventPublic,
    EvaluatorCreate,
    EvaluatorPublic,
    GrantAccept,
    GrantAcceptancePublic,
    GrantCreate,
    GrantPublic,
    GrantRevoke,
    GrantTermsProposal,
    KeyCreate,
    KeyCreated,
    KeyPublic,
    SealedItemPublic,
    SealedRelease,
)
from airlock.access.seal import check_grant
from airlock.access.service import AdminPrincipal, Principal
from airlock.db import utcnow
from airlock.deps import AuditDep, CurrentPrincipal, SessionDep, StateDep, require
from airlock.errors import InvalidRequestError, PermissionDeniedError
from airlock.evals.service import find_signing_key
from airlock.registry.models import Model, ModelVersion

router = APIRouter(prefix="/v1/airlock/admin", tags=["admin: access"])
grant_router = APIRouter(prefix="/v1/airlock/grant", tags=["evaluator: grant terms"])


@router.post("/evaluators", response_model=EvaluatorPublic, status_code=201)
def create_evaluator(
    body: EvaluatorCreate,
    session: SessionDep,
    admin: Annotated[AdminPrincipal, require(Permission.EVALUATORS_MANAGE)],
) -> EvaluatorPublic:
    """Register an evaluator organisation."""
    return EvaluatorPublic.of(service.create_evaluator(session, body.name, body.contact))


@router.get("/evaluators", response_model=list[EvaluatorPublic])
def list_evaluators(
    session: SessionDep, admin: Annotated[AdminPrincipal, require(Permission.EVALUATORS_READ)]
) -> list[EvaluatorPublic]:
    """List evaluator organisations."""
    return [EvaluatorPublic.of(e) for e in service.list_evaluators(session)]


@router.post("/grants", response_model=GrantPublic, status_code=201)
def create_grant(
    body: GrantCreate, session: SessionDep, admin: Annotated[AdminPrincipal, require(Permission.GRANTS_ISSUE)]
) -> GrantPublic:
    """Issue a grant."""
    if body.expires_in and body.not_after:
        raise InvalidRequestError("give either expires_in or not_after, not both")
    for value in (body.not_before, body.not_after):
        if value is not None and value.tzinfo is None:
            raise InvalidRequestError("timestamps must carry a timezone, e.g. 2026-12-01T00:00:00Z")
    not_after = body.not_after
    if body.expires_in:
        not_after = (body.not_before or utcnow()) + service.parse_duration(body.expires_in)
    grant = service.create_grant(
        session,
        service.GrantRequest(
            evaluator=body.evaluator,
            model=body.model,
            versions=body.versions,
            variants=body.variants,
            scopes=body.scopes,
            not_before=body.not_before.astimezone(UTC) if body.not_before else None,
            not_after=not_after,
            terms=body.terms,
            notes=body.notes,
            created_by=admin.name,
            issued_by_token_id=admin.token_id,
        ),
    )
    return GrantPublic.of(service.get_grant(session, grant.id))


@router.get("/grants", response_model=list[GrantPublic])
def list_grants(
    session: SessionDep,
    admin: Annotated[AdminPrincipal, require(Permission.GRANTS_READ)],
    evaluator: str | None = None,
    include_revoked: bool = True,
) -> list[GrantPublic]:
    """List grants, newest first."""
    return [
        GrantPublic.of(g) for g in service.list_grants(session, evaluator=evaluator, include_revoked=include_revoked)
    ]


@router.get("/grants/{grant_id}", response_model=GrantPublic)
def get_grant(
    grant_id: str, session: SessionDep, admin: Annotated[AdminPrincipal, require(Permission.GRANTS_READ)]
) -> GrantPublic:
    """Show one grant."""
    return GrantPublic.of(service.get_grant(session, grant_id))


@router.post("/grants/{grant_id}/revoke", response_model=GrantPublic)
def revoke_grant(
    grant_id: str,
    body: GrantRevoke,
    session: SessionDep,
    admin: Annotated[AdminPrincipal, require(Permission.ACCESS_REVOKE)],
) -> GrantPublic:
    """Revoke a grant at once."""
    return GrantPublic.of(service.revoke_grant(session, grant_id, body.reason))


@router.post("/grants/{grant_id}/keys", response_model=KeyCreated, status_code=201)
def create_key(
    grant_id: str,
    body: KeyCreate,
    session: SessionDep,
    admin: Annotated[AdminPrincipal, require(Permission.KEYS_ISSUE)],
) -> KeyCreated:
    """Create an API key for a grant (the key is in this response only)."""
    key, token = service.create_api_key(session, grant_id, body.name)
    return KeyCreated(id=key.id, grant_id=key.grant_id, key=token, display_prefix=key.display_prefix)


@router.post("/keys/{key_id}/revoke", response_model=KeyPublic)
def revoke_key(
    key_id: str, session: SessionDep, admin: Annotated[AdminPrincipal, require(Permission.ACCESS_REVOKE)]
) -> KeyPublic:
    """Revoke one API key."""
    return KeyPublic.of(service.revoke_api_key(session, key_id))


@router.get("/audit", response_model=list[AuditEventPublic])
def audit_tail(
    state: StateDep,
    session: SessionDep,
    admin: Annotated[AdminPrincipal, require(Permission.AUDIT_READ)],
    limit: int = Query(default=50, ge=1, le=1000),
    grant_id: str | None = None,
) -> list[AuditEventPublic]:
    """Return the newest audit events (oldest first)."""
    state.audit.flush()
    return [AuditEventPublic.of(e) for e in audit_service.tail(session, limit, grant_id=grant_id)]


# ---------------------------------------------------------------- the evaluator's side of its grant


def _callers_grant(session: SessionDep, principal: Principal) -> Grant:
    """Return the caller's grant, fresh and seal-checked (its terms decide what is accepted)."""
    grant = session.get(Grant, principal.grant_id)
    if grant is None:  # deleted under a live key: nothing to accept
        raise PermissionDeniedError("the grant of this API key no longer exists", code="grant_missing")
    check_grant(session, grant)
    return grant


@grant_router.get("/terms", response_model=GrantTermsProposal)
def proposed_terms(session: SessionDep, principal: CurrentPrincipal, audit: AuditDep) -> GrantTermsProposal:
    """Show the terms the lab proposes for your grant, their SHA-256, and whether you have accepted them."""
    grant = _callers_grant(session, principal)
    model = session.get(Model, grant.model_id)
    versions = [session.get(ModelVersion, vid) for vid in grant.version_ids]
    digest = acceptance.terms_sha256(grant)
    audit.detail["terms_sha256"] = digest
    return GrantTermsProposal(
        grant_id=grant.id,
        model=model.name if model is not None else grant.model_id,
        versions=[v.label if v is not None else vid for v, vid in zip(versions, grant.version_ids, strict=True)],
        proposal=acceptance.proposal(grant),
        terms_sha256=digest,
        acceptance=AcceptanceState.of(digest, acceptance.current_acceptance(session, grant)),
    )


@grant_router.post("/accept", response_model=GrantAcceptancePublic, status_code=201)
def accept_terms(
    body: GrantAccept, session: SessionDep, principal: CurrentPrincipal, audit: AuditDep
) -> GrantAcceptancePublic:
    """Accept your grant's current terms with a signature by your organisation's registered signing key."""
    grant = _callers_grant(session, principal)
    audit.detail["terms_sha256"] = body.terms_sha256
    audit.detail["key_fingerprint"] = body.key_fingerprint
    key = find_signing_key(session, body.key_fingerprint)
    if key is None or key.evaluator_id != principal.evaluator_id:
        raise PermissionDeniedError(
            "the signing key is not registered to your organisation (run `airlock evaluator keygen --register`)",
            code="unknown_signing_key",
        )
    signer = acceptance.SignerKey(
        evaluator_id=key.evaluator_id,
        public_key=key.public_key,
        fingerprint=key.fingerprint,
        revoked=key.revoked_at is not None,
    )
    row = acceptance.accept(
        session,
        grant,
        signer,
        terms_digest=body.terms_sha256,
        seal_public_key=body.seal_public_key,
        accepted_at=body.accepted_at,
        signature=body.signature,
    )
    audit.detail["acceptance_id"] = row.id
    return GrantAcceptancePublic.of(row)


# ---------------------------------------------------------------- sealed retention

sealed_router = APIRouter(prefix="/v1/airlock/sealed", tags=["evaluator: sealed items"])
sealed_admin_router = APIRouter(prefix="/v1/airlock/admin/sealed", tags=["admin: sealed items"])
SealedReader = Annotated[AdminPrincipal, require(Permission.SEALED_READ)]


@sealed_router.get("", response_model=list[SealedItemPublic])
def list_sealed(session: SessionDep, principal: CurrentPrincipal, audit: AuditDep) -> list[SealedItemPublic]:
    """List the items the lab holds sealed to your key under this key's grant (metadata only)."""
    audit.scope = "sealed"
    return [SealedItemPublic.of(item) for item in sealing.items_of_grant(session, principal.grant_id)]


@sealed_router.get("/{item_id}", response_model=SealedItemPublic)
def get_sealed(item_id: str, session: SessionDep, principal: CurrentPrincipal, audit: AuditDep) -> SealedItemPublic:
    """Return one sealed item's metadata."""
    audit.scope = "sealed"
    audit.detail["sealed_item"] = item_id
    return SealedItemPublic.of(sealing.own_item(session, principal.grant_id, item_id))


@sealed_router.get("/{item_id}/ciphertext", response_class=Response)
def get_sealed_ciphertext(
    item_id: str, state: StateDep, session: SessionDep, principal: CurrentPrincipal, audit: AuditDep
) -> Response:
    """Return the item's sealed box (libsodium ``crypto_box_seal``); open it with your seal key."""
    audit.scope = "sealed"
    audit.detail["sealed_item"] = item_id
    item = sealing.own_item(session, principal.grant_id, item_id)
    data = sealing.ciphertext(item, state.settings.artifacts_dir)
    audit.detail["bytes"] = len(data)
    headers = {"Content-Disposition": f'attachment; filename="{item.id}.sealed"'}
    return Response(content=data, media_type="application/octet-stream", headers=headers)


@sealed_router.post("/{item_id}/release", response_model=SealedItemPublic)
def release_sealed(
    item_id: str,
    body: SealedRelease,
    state: StateDep,
    session: SessionDep,
    principal: CurrentPrincipal,
    audit: AuditDep,
) -> SealedItemPublic:
    """Release an item to the lab: send its plaintext; it must match the digest recorded at sealing.

    The lab stores it readable from then on, and the ledger records ``sealed.released`` (item,
    grant, SHA-256, who). Wrong content is 400 ``sealed_plaintext_mismatch`` and changes nothing.
    """
    audit.scope = "sealed"
    audit.detail["sealed_item"] = item_id
    item = sealing.own_item(session, principal.grant_id, item_id)
    try:
        plaintext = base64.b64decode(body.content_base64, validate=True)
    except binascii.Error:
        raise InvalidRequestError("content_base64 is not valid base64", param="content_base64") from None
    who = f"{principal.evaluator_name} (key {principal.key_id})"
    sealing.release(session, item, plaintext, released_by=who, home=state.settings.artifacts_dir)
    audit.detail["released"] = True
    return SealedItemPublic.of(item)


@sealed_admin_router.get("", response_model=list[SealedItemPublic])
def lab_list_sealed(
    session: SessionDep, admin: SealedReader, grant: Annotated[str | None, Query(max_length=40)] = None
) -> list[SealedItemPublic]:
    """List sealed items (of one grant with ``?grant=``): metadata only; the lab cannot open them."""
    return [SealedItemPublic.of(item) for item in sealing.list_items(session, grant_id=grant)]


@sealed_admin_router.get("/{item_id}", response_model=SealedItemPublic)
def lab_get_sealed(item_id: str, session: SessionDep, admin: SealedReader) -> SealedItemPublic:
    """Return one sealed item's metadata."""
    return SealedItemPublic.of(sealing.get_item(session, item_id))


@sealed_admin_router.get("/{item_id}/content", response_class=Response)
def lab_released_content(
    item_id: str, state: StateDep, session: SessionDep, admin: SealedReader, audit: AuditDep
) -> Response:
    """Return a released item's plaintext (409 ``sealed_item_not_released`` while it is still sealed)."""
    audit.detail["sealed_item"] = item_id
    item = sealing.get_item(session, item_id)
    data = sealing.released_content(item, state.settings.artifacts_dir)
    headers = {"Content-Disposition": f'attachment; filename="{item.id}"'}
    return Response(content=data, media_type="application/octet-stream", headers=headers)
