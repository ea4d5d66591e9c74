"""Admin routes for the registry: sync a manifest, list models, change a version's stage."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from airlock.access.roles import Permission
from airlock.access.service import AdminPrincipal
from airlock.errors import ConfigError, InvalidRequestError
from airlock.gateway.deps import SessionDep, StateDep, require
from airlock.governance.service import promote_as, refuse_gated_manifest_stages
from airlock.registry import service
from airlock.registry.schemas import (
    MitigationPublic,
    ModelPublic,
    Stage,
    SyncReport,
    VariantPublic,
    VersionPublic,
)

router = APIRouter(prefix="/v1/airlock/admin", tags=["admin: registry"])


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


def _public(models: list[Any]) -> list[ModelPublic]:
    return [
        ModelPublic(
            id=m.id,
            name=m.name,
            description=m.description,
            versions=[
                VersionPublic(
                    id=v.id,
                    label=v.label,
                    content_hash=v.content_hash,
                    stage=v.stage,
                    created_at=v.created_at,
                    variants=[
                        VariantPublic(
                            id=var.id,
                            name=var.name,
                            backend=var.backend,
                            mitigations=[
                                MitigationPublic(name=x.name, kind=x.kind, stance=x.stance, position=x.position)
                                for x in var.mitigations
                            ],
                        )
                        for var in v.variants
                    ],
                )
                for v in m.versions
            ],
        )
        for m in models
    ]


@router.post("/manifest", response_model=SyncReport)
def sync_manifest(
    body: dict[str, Any],
    state: StateDep,
    session: SessionDep,
    admin: Annotated[AdminPrincipal, require(Permission.REGISTRY_MANAGE)],
) -> SyncReport:
    """Create or update models, versions, variants and mitigations from a manifest document."""
    try:
        manifest = service.parse_manifest(body, source="manifest")
        refuse_gated_manifest_stages(session, manifest, state.settings.policy_path)
        report = service.sync_manifest(session, manifest, actor=admin.name)
        session.commit()
        state.registry.clear()
        return report
    except ConfigError as exc:  # the operator's document is the request here: a 400, not a 500
        raise InvalidRequestError(exc.message, code="invalid_manifest") from None


@router.get("/models", response_model=list[ModelPublic])
def list_models(
    session: SessionDep, admin: Annotated[AdminPrincipal, require(Permission.REGISTRY_READ)]
) -> list[ModelPublic]:
    """List every model with its versions, variants and mitigation stances."""
    return _public(service.list_models(session))


@router.post("/models/{model}/versions/{label}/stage", response_model=list[ModelPublic])
def change_stage(
    model: str,
    label: str,
    body: StageChangeRequest,
    state: StateDep,
    session: SessionDep,
    admin: Annotated[AdminPrincipal, require(Permission.STAGE_CHANGE)],
) -> Any:
    """Move a version to another lifecycle stage; gated stages go through the deployment gate (409 on block)."""
    row = service.get_version(session, service.get_model(session, model), label)
    # Never set_stage directly: the gate must not be bypassable through the admin API.
    outcome = promote_as(
        session,
        row,
        body.stage,
        name=admin.name,
        role=admin.role,
        token_id=admin.token_id,
        policy_path=state.settings.policy_path,
        justification=body.justification,
    )
    session.commit()  # the gate decision is kept even when the promotion is refused
    state.registry.clear()
    outcome.raise_if_refused()
    return _public([service.get_model(session, model)])
