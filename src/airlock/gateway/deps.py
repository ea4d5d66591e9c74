"""Typed FastAPI dependencies: a route's signature is its list of requirements."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from airlock.access.audit import AuditWriter
from airlock.access.quotas import RateLimiter
from airlock.access.service import (
    AdminPrincipal,
    Principal,
    authenticate_admin,
    authenticate_key,
    identify_key,
)
from airlock.backends.pool import BackendPool
from airlock.config import Settings
from airlock.db import Database
from airlock.errors import AuthenticationError
from airlock.gateway.middleware import AuditContext
from airlock.registry.service import RegistryCache


@dataclass
class GatewayState:
    """Process-wide objects the routes share."""

    settings: Settings
    db: Database
    audit: AuditWriter
    pool: BackendPool
    limiter: RateLimiter
    registry: RegistryCache


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
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def get_principal(
    request: Request,
    state: Annotated[GatewayState, Depends(get_state)],
    audit: Annotated[AuditContext, Depends(get_audit)],
) -> Principal:
    """Authenticate the evaluator key of this request (401 otherwise) and note it for the audit."""
    audit.actor_type = "evaluator"
    token = _bearer(request)
    with state.db.session() as session:
        try:
            principal = authenticate_key(session, token)
        except AuthenticationError:
            # A revoked key still tells whose it was: record that, then refuse.
            known = identify_key(session, token)
            if known is not None:
                audit.actor, audit.evaluator_id = known.evaluator_name, known.evaluator_id
                audit.grant_id, audit.key_id = known.grant_id, known.key_id
            raise
    audit.actor = principal.evaluator_name
    audit.evaluator_id = principal.evaluator_id
    audit.grant_id = principal.grant_id
    audit.key_id = principal.key_id
    return principal


def get_admin(
    request: Request,
    state: Annotated[GatewayState, Depends(get_state)],
    audit: Annotated[AuditContext, Depends(get_audit)],
) -> AdminPrincipal:
    """Authenticate the lab admin token of this request (401 otherwise)."""
    audit.actor_type = "admin"
    with state.db.session() as session:
        admin = authenticate_admin(session, _bearer(request))
    audit.actor = admin.name
    return admin


StateDep = Annotated[GatewayState, Depends(get_state)]
# "function" scope: commit before the response is sent, so a client never sees a 2xx for a write that
# has not landed (the default "request" scope would commit after the response).
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
AuditDep = Annotated[AuditContext, Depends(get_audit)]
CurrentPrincipal = Annotated[Principal, Depends(get_principal)]
AdminDep = Annotated[AdminPrincipal, Depends(get_admin)]
