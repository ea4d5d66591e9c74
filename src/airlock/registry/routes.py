"""Admin routes for the registry: sync a manifest, list models (stage changes are the gate's: governance)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter

from airlock.access.roles import Permission
from airlock.access.service import AdminPrincipal
from airlock.deps import SessionDep, StateDep, require
from airlock.errors import ConfigError, InvalidRequestError
from airlock.governance.service import refuse_gated_manifest_stages
from airlock.mitigations import check_manifest
from airlock.registry import service
from airlock.registry.schemas import ModelPublic, SyncReport

router = APIRouter(prefix="/v1/airlock/admin", tags=["admin: registry"])


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
        check_manifest(manifest)
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
    return [ModelPublic.of(m) for m in service.list_models(session)]
