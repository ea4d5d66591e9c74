"""HTTP routes of the contamination firewall: evaluators register fingerprints; the lab opens and completes checks."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter
from sqlalchemy.orm import Session

from airlock.access.roles import Permission
from airlock.access.service import AdminPrincipal
from airlock.contamination import service
from airlock.contamination.models import ContaminationRegistration
from airlock.contamination.schemas import (
    CheckOpen,
    CheckOpened,
    CheckPublic,
    CheckReport,
    FingerprintUpload,
    RegistrationPublic,
)
from airlock.deps import AuditDep, CurrentPrincipal, SessionDep, require

router = APIRouter(prefix="/v1/airlock/contamination", tags=["evaluator: contamination"])
admin_router = APIRouter(prefix="/v1/airlock/admin/contamination", tags=["admin: contamination"])
Reader = Annotated[AdminPrincipal, require(Permission.CONTAMINATION_READ)]
Checker = Annotated[AdminPrincipal, require(Permission.CONTAMINATION_CHECK)]


def _views(session: Session, rows: list[ContaminationRegistration]) -> list[RegistrationPublic]:
    hits = service.hits_by_registration(session, [r.id for r in rows])
    completed = [c for c in service.list_checks(session) if c.status == "completed"]
    return [RegistrationPublic.of(r, sum(r.id in c.registrations for c in completed), hits.get(r.id, [])) for r in rows]


# ---------------------------------------------------------------- evaluator


@router.post("/registrations", response_model=RegistrationPublic, status_code=201)
def register(
    body: FingerprintUpload, session: SessionDep, principal: CurrentPrincipal, audit: AuditDep
) -> RegistrationPublic:
    """Register a fingerprinted test set (from `airlock contamination fingerprint`) under your organisation.

    Only hashes arrive: the lab's checks can tell which corpus document holds which of your item
    ids, never the items themselves. The registration is a ledger event (counts and digest).
    """
    row = service.register(session, principal, body.model_dump())
    audit.detail["registration_id"] = row.id
    return RegistrationPublic.of(row)


@router.get("/registrations", response_model=list[RegistrationPublic])
def list_registrations(session: SessionDep, principal: CurrentPrincipal) -> list[RegistrationPublic]:
    """List your organisation's registrations, with the items the lab's checks found."""
    return _views(session, service.registrations_of(session, principal.evaluator_id))


@router.get("/registrations/{registration_id}", response_model=RegistrationPublic)
def get_registration(registration_id: str, session: SessionDep, principal: CurrentPrincipal) -> RegistrationPublic:
    """Return one of your organisation's registrations with the items checks found."""
    return _views(session, [service.own_registration(session, principal, registration_id)])[0]


@router.post("/registrations/{registration_id}/withdraw", response_model=RegistrationPublic)
def withdraw(
    registration_id: str, session: SessionDep, principal: CurrentPrincipal, audit: AuditDep
) -> RegistrationPublic:
    """Take a registration out of future checks (a ledger event)."""
    audit.detail["registration_id"] = registration_id
    row = service.withdraw(session, principal, registration_id)
    return _views(session, [row])[0]


# ---------------------------------------------------------------- lab


@admin_router.post("/checks", response_model=CheckOpened, status_code=201)
def open_check(body: CheckOpen, session: SessionDep, admin: Checker, audit: AuditDep) -> CheckOpened:
    """Open a check: receive every active registration's fingerprint to run `airlock contamination check` with.

    The ledger records who received which registrations before anything is returned.
    """
    row, fingerprints = service.open_check(session, service.Actor(admin.name, admin.role, admin.token_id), body.corpus)
    audit.detail["check_id"] = row.id
    return CheckOpened(
        check=CheckPublic.of(row),
        fingerprints=[{**fp.to_json(), "registration": rid} for rid, fp in fingerprints],
    )


@admin_router.post("/checks/{check_id}/result", response_model=CheckPublic)
def report_check(check_id: str, body: CheckReport, session: SessionDep, admin: Checker, audit: AuditDep) -> CheckPublic:
    """Report a check's outcome: documents scanned and matched, and per item how many documents held it."""
    audit.detail["check_id"] = check_id
    result = service.CheckResult(
        body.documents,
        body.matched_documents,
        body.corpus_digest,
        [service.ItemHit(h.registration, h.item, h.documents, h.max_fraction) for h in body.hits],
    )
    actor = service.Actor(admin.name, admin.role, admin.token_id)
    return CheckPublic.of(service.complete_check(session, check_id, actor, result))


@admin_router.get("/checks", response_model=list[CheckPublic])
def list_checks(session: SessionDep, admin: Reader) -> list[CheckPublic]:
    """List contamination checks, newest first."""
    return [CheckPublic.of(c) for c in service.list_checks(session)]


@admin_router.get("/registrations", response_model=list[RegistrationPublic])
def lab_registrations(session: SessionDep, admin: Reader) -> list[RegistrationPublic]:
    """List every registration (counts and digests, never hashes), with the items checks found."""
    return _views(session, service.all_registrations(session))
