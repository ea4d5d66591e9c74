"""Evaluator routes for signing keys and attested results; admin route to list all results."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from airlock.access.roles import Permission
from airlock.access.service import AdminPrincipal
from airlock.deps import AuditDep, CurrentPrincipal, SessionDep, StateDep, require
from airlock.evals import service
from airlock.evals.schemas import (
    ElicitationReport,
    EvalResultPublic,
    ResultEnvelope,
    SigningKeyCreate,
    SigningKeyPublic,
)

router = APIRouter(prefix="/v1/airlock", tags=["evaluator: results"])
admin_router = APIRouter(prefix="/v1/airlock/admin", tags=["admin: results"])


@router.post("/signing-keys", response_model=SigningKeyPublic, status_code=201)
def register_key(body: SigningKeyCreate, session: SessionDep, principal: CurrentPrincipal) -> SigningKeyPublic:
    """Register an Ed25519 public key that will sign your organisation's results."""
    row = service.register_signing_key(
        session, principal.evaluator_id, body.public_key, registered_by=f"key:{principal.key_id}"
    )
    return SigningKeyPublic.of(row)


@router.post("/results", response_model=EvalResultPublic, status_code=201)
def submit(body: ResultEnvelope, session: SessionDep, principal: CurrentPrincipal, audit: AuditDep) -> EvalResultPublic:
    """Submit a signed eval result; it is verified against your key and your grant before storing."""
    audit.model = str(body.attestation.get("model_id", ""))[:200] or None
    audit.variant = str(body.attestation.get("variant", ""))[:100] or None
    row = service.submit_result(session, principal, body)
    audit.detail["result_id"] = row.id
    return EvalResultPublic.of(row)


@router.get("/results", response_model=list[EvalResultPublic])
def my_results(session: SessionDep, principal: CurrentPrincipal) -> list[EvalResultPublic]:
    """List your organisation's accepted results."""
    return [EvalResultPublic.of(r) for r in service.list_results(session, evaluator_id=principal.evaluator_id)]


_MODEL = Query(min_length=3, max_length=200, description="The model version, `{model}@{version}`.")
_TASK = Query(min_length=1, max_length=200, description="The task whose results are compared.")


def _report(session: SessionDep, state: StateDep, model: str, task: str, evaluator_id: str | None) -> ElicitationReport:
    """Build the report with the sandbagging settings of the policy in force (the defaults without one)."""
    from airlock.governance.service import policy_for_request, sandbagging_settings

    checks = sandbagging_settings(policy_for_request(state.settings.policy_path))
    report = service.elicitation_report(
        session, model, task, evaluator_id=evaluator_id, alpha=checks.alpha, few_shot_min_gain=checks.few_shot_min_gain
    )
    return ElicitationReport.model_validate(report)


@router.get("/results/elicitation", response_model=ElicitationReport)
def my_elicitation(
    session: SessionDep,
    state: StateDep,
    principal: CurrentPrincipal,
    model: Annotated[str, _MODEL],
    task: Annotated[str, _TASK],
) -> ElicitationReport:
    """Your organisation's results of one task by elicitation level, with the sandbagging checks."""
    return _report(session, state, model, task, principal.evaluator_id)


@admin_router.get("/results/elicitation", response_model=ElicitationReport)
def elicitation(
    session: SessionDep,
    state: StateDep,
    admin: Annotated[AdminPrincipal, require(Permission.RESULTS_READ)],
    model: Annotated[str, _MODEL],
    task: Annotated[str, _TASK],
) -> ElicitationReport:
    """Every evaluator's results of one task by elicitation level, with the sandbagging checks."""
    return _report(session, state, model, task, None)


@admin_router.get("/results", response_model=list[EvalResultPublic])
def all_results(
    session: SessionDep,
    admin: Annotated[AdminPrincipal, require(Permission.RESULTS_READ)],
    variant: str | None = None,
) -> list[EvalResultPublic]:
    """List every accepted result."""
    return [EvalResultPublic.of(r) for r in service.list_results(session, variant=variant)]
