"""HTTP routes of the gate: reports, promotions (with overrides), history, trend, the policy.

Reading needs a lab token whose role may read the gate; promoting needs one that may change stages,
and an override additionally the policy's decider role (``roles.decides``).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field

from airlock.access.roles import Permission
from airlock.access.service import AdminPrincipal
from airlock.deps import SessionDep, StateDep, require
from airlock.errors import ConflictError
from airlock.governance import service
from airlock.governance.policy import Policy
from airlock.governance.schemas import DecisionPublic, GateStage, PolicyPublic, PromoteRequest, PromotionPublic
from airlock.registry.models import ModelVersion
from airlock.registry.schemas import ModelPublic, Stage
from airlock.registry.service import get_model, get_version

router = APIRouter(prefix="/v1/airlock/gate", tags=["governance: gate"])
# The admin API's stage route: a stage change is a gate decision, so it lives here (same path as ever).
stage_router = APIRouter(prefix="/v1/airlock/admin", tags=["admin: registry"])
GateReader = Annotated[AdminPrincipal, require(Permission.GATE_READ)]


def _policy(state: StateDep) -> Policy:
    policy = service.policy_for_request(state.settings.policy_path)
    if policy is None:
        raise ConflictError(
            f"no policy at {state.settings.policy_path}; the gate cannot be evaluated", code="no_policy"
        )
    return policy


@router.get("/policy", response_model=PolicyPublic)
def get_policy(state: StateDep, admin: GateReader) -> PolicyPublic:
    """Return the policy in force and its SHA-256."""
    policy = _policy(state)
    return PolicyPublic(
        path=str(state.settings.policy_path), sha256=policy.sha256(), policy=policy.model_dump(mode="json")
    )


@router.get("/models/{model}/versions/{label}")
def check(
    model: str,
    label: str,
    state: StateDep,
    session: SessionDep,
    admin: GateReader,
    stage: Annotated[GateStage, Query(description="The stage the version would move to.")] = "deployed",
) -> dict[str, Any]:
    """Evaluate the gate for a version and return the JSON report (nothing is recorded)."""
    policy = _policy(state)
    row = get_model(session, model)
    return service.evaluate_gate(session, row, get_version(session, row, label), stage, policy)


def _promote(
    state: StateDep,
    session: SessionDep,
    admin: AdminPrincipal,
    version: ModelVersion,
    stage: str,
    justification: str | None,
) -> service.Promotion:
    """Ask the gate to move ``version`` for ``admin``; keep its decision even when it refuses (then raise)."""
    outcome = service.promote_as(
        session,
        version,
        stage,
        name=admin.name,
        role=admin.role,
        token_id=admin.token_id,
        policy_path=state.settings.policy_path,
        justification=justification,
    )
    session.commit()  # the gate decision is kept even when the promotion is refused
    state.registry.clear()
    outcome.raise_if_refused()
    return outcome


@router.post("/models/{model}/versions/{label}/promote", response_model=PromotionPublic)
def promote(
    model: str,
    label: str,
    body: PromoteRequest,
    state: StateDep,
    session: SessionDep,
    admin: Annotated[AdminPrincipal, require(Permission.STAGE_CHANGE)],
) -> PromotionPublic:
    """Move a version to a stage through the gate (409 when it blocks; an override needs the decider role)."""
    row = get_model(session, model)
    version = get_version(session, row, label)
    outcome = _promote(
        state, session, admin, version, body.stage, body.override.justification if body.override else None
    )
    return PromotionPublic(
        model=row.name,
        version=version.label,
        stage=version.stage,
        promoted=outcome.promoted,
        message=outcome.message,
        decision=DecisionPublic.of(outcome.decision, outcome.override) if outcome.decision else None,
    )


@router.get("/models/{model}/versions/{label}/history", response_model=list[DecisionPublic])
def history(model: str, label: str, session: SessionDep, admin: GateReader) -> list[DecisionPublic]:
    """List the version's gate decisions and overrides, oldest first."""
    row = get_model(session, model)
    return [DecisionPublic.of(d, o) for d, o in service.history(session, get_version(session, row, label))]


@router.get("/decisions/{decision_id}")
def decision_report(decision_id: str, session: SessionDep, admin: GateReader) -> dict[str, Any]:
    """Return the full report recorded with a gate decision."""
    report: dict[str, Any] = service.get_decision(session, decision_id).report
    return report


@router.get("/models/{model}/trend")
def trend(model: str, state: StateDep, session: SessionDep, admin: GateReader) -> dict[str, Any]:
    """Return each domain's metric across the model's versions with thresholds and extrapolation."""
    return service.trend(session, get_model(session, model), _policy(state))


class StageChangeRequest(BaseModel):
    """Move a version to another stage (through the deployment gate where the policy says so)."""

    model_config = ConfigDict(extra="forbid")
    stage: Stage
    justification: str | None = Field(
        default=None,
        min_length=1,
        max_length=10_000,
        description="Override a blocking gate: needs the policy's decider role; recorded and published.",
    )


@stage_router.post("/models/{model}/versions/{label}/stage", response_model=list[ModelPublic])
def change_stage(
    model: str,
    label: str,
    body: StageChangeRequest,
    state: StateDep,
    session: SessionDep,
    admin: Annotated[AdminPrincipal, require(Permission.STAGE_CHANGE)],
) -> Any:
    """Move a version to another lifecycle stage; gated stages go through the deployment gate (409 on block)."""
    # Never set_stage directly: the gate must not be bypassable through the admin API.
    _promote(
        state, session, admin, get_version(session, get_model(session, model), label), body.stage, body.justification
    )
    return [ModelPublic.of(get_model(session, model))]
