"""Typed FastAPI dependencies: a route's signature is its list of requirements."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session

from airlock.access.audit import AuditWriter
from airlock.access.cache import AuthCache
from airlock.access.middleware import AuditContext
from airlock.access.quotas import RateLimiter
from airlock.access.roles import Permission, check_independent_review
from airlock.access.seal import GrantIntegrityError
from airlock.access.service import (
    AdminPrincipal,
    Principal,
    authenticate_admin,
    identify_key,
)
from airlock.backends.pool import BackendPool
from airlock.config import Settings
from airlock.db import Database
from airlock.errors import AuthenticationError, PermissionDeniedError
from airlock.registry.service import RegistryCache
from airlock.serving.pipelines import PipelineCache


@dataclass
class GatewayState:
    """Process-wide objects the routes share."""

    settings: Settings
    db: Database
    audit: AuditWriter
    pool: BackendPool
    pipelines: PipelineCache
    limiter: RateLimiter
    registry: RegistryCache
    auth: AuthCache


# Trivial dependencies are `async def` on purpose: FastAPI runs plain `def` dependencies in the
# thread pool, and each hop costs more than the work they do.
async def get_state(request: Request) -> GatewayState:
    """Return the gateway state attached to the app."""
    state: GatewayState = request.app.state.gateway
    return state


async def get_audit(request: Request) -> AuditContext:
    """Return the audit context of this request (created by AuditMiddleware)."""
    ctx = request.scope.get("airlock.audit")
    if ctx is None:  # unaudited paths still get a scratch context so routes need no branches
        ctx = AuditContext(request_id="unaudited")
        request.scope["airlock.audit"] = ctx
    assert isinstance(ctx, AuditContext)
    return ctx


def get_session(state: Annotated[GatewayState, Depends(get_state)]) -> Iterator[Session]:
    """Yield a database session that commits when the route succeeds."""
    with state.db.session() as session:
        yield session


def _bearer(request: Request) -> str | None:
    return bearer_token(request.headers.get("authorization", ""))


def bearer_token(header: str) -> str | None:
    """Return the token of a ``Bearer`` ``Authorization`` header value, or None."""
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


async def get_principal(
    request: Request,
    state: Annotated[GatewayState, Depends(get_state)],
    audit: Annotated[AuditContext, Depends(get_audit)],
) -> Principal:
    """Authenticate the evaluator key of this request (401 otherwise) and note it for the audit.

    A key seen in the last few seconds is answered from the authentication cache, which every
    revocation empties in every process (``airlock.access.cache``); otherwise the database decides.
    """
    return await authenticate_evaluator(state, request.headers.get("authorization", ""), audit)


async def authenticate_evaluator(state: GatewayState, authorization: str, audit: AuditContext) -> Principal:
    """Authenticate an ``Authorization`` header's evaluator key (401 otherwise) and note it for the audit."""
    audit.actor_type = "evaluator"
    token = bearer_token(authorization)
    principal = state.auth.lookup(token)
    if principal is None:
        principal = await run_in_threadpool(_authenticate, state, token, audit)
    audit.actor = principal.evaluator_name
    audit.evaluator_id = principal.evaluator_id
    audit.grant_id = principal.grant_id
    audit.key_id = principal.key_id
    return principal


def _authenticate(state: GatewayState, token: str | None, audit: AuditContext) -> Principal:
    with state.db.session() as session:
        try:
            return state.auth.authenticate(session, token)
        except (AuthenticationError, GrantIntegrityError):
            # A revoked key, or one whose grant failed its seal, still tells whose it was: record that, then refuse.
            known = identify_key(session, token)
            if known is not None:
                audit.actor, audit.evaluator_id = known.evaluator_name, known.evaluator_id
                audit.grant_id, audit.key_id = known.grant_id, known.key_id
            raise


def get_admin(
    request: Request,
    state: Annotated[GatewayState, Depends(get_state)],
    audit: Annotated[AuditContext, Depends(get_audit)],
) -> AdminPrincipal:
    """Authenticate the lab admin token of this request (401 otherwise) and note it for the audit.

    Authentication only: a route takes ``require(Permission.X)``, which also checks the role.
    """
    audit.actor_type = "admin"
    with state.db.session() as session:
        admin = authenticate_admin(session, _bearer(request))
    audit.actor = admin.name
    # Names of lab tokens are not unique: the token id and role make the row attributable.
    audit.detail.update({"admin_token_id": admin.token_id, "role": admin.role})
    return admin


def _record_denial(audit: AuditContext, exc: PermissionDeniedError) -> None:
    audit.outcome = "denied"
    audit.detail["denied"] = exc.message


class RequirePermission:
    """A dependency: the request's lab token, refused (403 ``role_not_allowed``, audited) without ``permission``."""

    def __init__(self, permission: Permission) -> None:
        self.permission = permission

    async def __call__(
        self, admin: Annotated[AdminPrincipal, Depends(get_admin)], audit: Annotated[AuditContext, Depends(get_audit)]
    ) -> AdminPrincipal:
        """Check the role of the authenticated token against the role matrix."""
        audit.detail["permission"] = self.permission.value
        try:
            admin.require(self.permission)
        except PermissionDeniedError as exc:
            _record_denial(audit, exc)
            raise
        return admin


def require(permission: Permission) -> Any:
    """Return the marker a route puts in ``Annotated[AdminPrincipal, ...]`` to need ``permission``."""
    return Depends(RequirePermission(permission))


def require_independent_review(
    session: Session, admin: AdminPrincipal, audit: AuditContext, grant_id: str, what: str
) -> None:
    """Refuse (403 ``issuer_cannot_review``, audited) a review by the token that issued the work's grant."""
    try:
        check_independent_review(session, admin.token_id, grant_id, what)
    except PermissionDeniedError as exc:
        _record_denial(audit, exc)
        raise


StateDep = Annotated[GatewayState, Depends(get_state)]
# "function" scope: commit before the response is sent, so a client never sees a 2xx for a write that
# has not landed (the default "request" scope would commit after the response).
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
AuditDep = Annotated[AuditContext, Depends(get_audit)]
CurrentPrincipal = Annotated[Principal, Depends(get_principal)]
# Authentication without a role check: admin routes take ``Annotated[AdminPrincipal, require(...)]``
# instead, and the role-matrix test fails for any admin route that declares no permission.
AdminDep = Annotated[AdminPrincipal, Depends(get_admin)]
