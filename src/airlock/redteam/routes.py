"""HTTP routes of red-teaming: the red-teamer's sessions, turns and findings; the lab's findings triage."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from airlock.access.middleware import AuditContext
from airlock.access.roles import Permission
from airlock.access.service import AdminPrincipal, Principal
from airlock.deps import AuditDep, CurrentPrincipal, SessionDep, StateDep, require, require_independent_review
from airlock.errors import AirlockError
from airlock.redteam import service
from airlock.redteam.schemas import (
    FindingCreate,
    FindingPublic,
    HoursPublic,
    SessionCreate,
    SessionPublic,
    TriageRequest,
    TurnCreate,
    TurnPublic,
)
from airlock.serving.service import ServingState

router = APIRouter(prefix="/v1/airlock/redteam", tags=["evaluator: red-teaming"])
admin_router = APIRouter(prefix="/v1/airlock/admin/redteam", tags=["admin: red-teaming"])
FindingReader = Annotated[AdminPrincipal, require(Permission.REDTEAM_READ)]
FindingTriager = Annotated[AdminPrincipal, require(Permission.REDTEAM_TRIAGE)]


# ---------------------------------------------------------------- red-teamer


@router.get("/hours", response_model=HoursPublic)
def my_hours(session: SessionDep, principal: CurrentPrincipal) -> HoursPublic:
    """Return your red-teaming hours on this grant: granted, used (active session time), left."""
    return HoursPublic.of(service.hours_of(session, principal.grant, principal.key_id))


@router.post("/sessions", response_model=SessionPublic, status_code=201)
async def create_session(
    body: SessionCreate, state: StateDep, principal: CurrentPrincipal, audit: AuditDep
) -> SessionPublic:
    """Open a session with one granted variant, or two side by side (needs the `redteam` scope)."""
    row = await service.start_session(state, principal, audit, body.models, body.title)
    return SessionPublic.of(row, [])


@router.get("/sessions", response_model=list[SessionPublic])
def list_sessions(session: SessionDep, principal: CurrentPrincipal) -> list[SessionPublic]:
    """List your own sessions, newest first (no one else's)."""
    return [SessionPublic.of(r) for r in service.list_own_sessions(session, principal)]


@router.get("/sessions/{session_id}", response_model=SessionPublic)
def get_session(session_id: str, session: SessionDep, principal: CurrentPrincipal) -> SessionPublic:
    """Return one of your sessions with its transcript."""
    row = service.own_session(session, principal, session_id)
    return SessionPublic.of(row, service.transcript(session, row.id))


async def turn_events(
    state: ServingState, principal: Principal, audit: AuditContext, session_id: str, body: TurnCreate
) -> AsyncIterator[str]:
    """Yield a turn as server-sent events: ``{"variant", "delta"}`` pieces, then ``{"turn": …}``, then ``[DONE]``."""
    events = service.take_turn(state, principal, audit, session_id, body.content, max_tokens=body.max_tokens)
    sent = False
    try:
        async for event in events:
            payload: dict[str, Any]
            if event.turn is not None:
                payload = {"turn": TurnPublic.of(event.turn).model_dump(mode="json")}
            else:
                payload = {"variant": event.variant, "delta": event.text}
            yield f"data: {json.dumps(payload)}\n\n"
            sent = True
    except AirlockError as exc:
        if not sent:
            raise  # nothing streamed yet: the route answers with the error's own status
        audit.error_code, audit.outcome = exc.code, "error"
        yield f"data: {json.dumps(exc.to_openai())}\n\n"
    yield "data: [DONE]\n\n"


async def streamed(body: AsyncIterator[str]) -> StreamingResponse:
    """Start a stream only once its first event exists, so early refusals keep their HTTP status."""
    first = await body.__anext__()

    async def _rest() -> AsyncIterator[str]:
        yield first
        async for event in body:
            yield event

    return StreamingResponse(_rest(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@router.post("/sessions/{session_id}/turns", response_model=TurnPublic, status_code=201)
async def create_turn(
    session_id: str, body: TurnCreate, state: StateDep, principal: CurrentPrincipal, audit: AuditDep
) -> TurnPublic | StreamingResponse:
    """Send a prompt to the session's variants; every turn is kept as the transcript.

    Refused with 403 ``redteam_hours_exhausted`` once your active session time reaches the grant's
    ``redteam_hours``. With ``stream``, the answers arrive as server-sent events.
    """
    if body.stream:
        return await streamed(turn_events(state, principal, audit, session_id, body))
    turn = await service.run_turn(state, principal, audit, session_id, body.content, max_tokens=body.max_tokens)
    return TurnPublic.of(turn)


@router.post("/sessions/{session_id}/close", response_model=SessionPublic)
def close_session(session_id: str, session: SessionDep, principal: CurrentPrincipal) -> SessionPublic:
    """Close your session; its summary (hours, findings by severity) goes into the ledger."""
    row = service.close_session(session, principal, session_id)
    return SessionPublic.of(row)


@router.post("/sessions/{session_id}/findings", response_model=FindingPublic, status_code=201)
def create_finding(
    session_id: str, body: FindingCreate, session: SessionDep, principal: CurrentPrincipal, audit: AuditDep
) -> FindingPublic:
    """Flag one variant's answer to one turn of your session as a finding."""
    draft = service.FindingDraft(body.turn, body.variant, body.category, body.severity, body.title, body.notes)
    finding = service.flag_finding(session, principal, session_id, draft)
    audit.detail["finding_id"] = finding.id
    return FindingPublic.of(finding)


@router.get("/findings", response_model=list[FindingPublic])
def list_my_findings(session: SessionDep, principal: CurrentPrincipal) -> list[FindingPublic]:
    """List the findings you flagged, newest first, with the lab's triage."""
    return [FindingPublic.of(f) for f in service.own_findings(session, principal)]


# ---------------------------------------------------------------- lab


@admin_router.get("/findings", response_model=list[FindingPublic])
def lab_findings(
    session: SessionDep,
    admin: FindingReader,
    model: Annotated[str | None, Query(description="Only this model's findings.")] = None,
    status: Annotated[str | None, Query(description="open, acknowledged, disputed or fixed.")] = None,
    severity: Annotated[str | None, Query(description="low, medium, high or critical.")] = None,
) -> list[FindingPublic]:
    """List red-teaming findings for triage, newest first."""
    return [FindingPublic.of(f) for f in service.list_findings(session, model=model, status=status, severity=severity)]


@admin_router.get("/findings/{finding_id}/session", response_model=SessionPublic)
def lab_finding_session(finding_id: str, session: SessionDep, admin: FindingReader) -> SessionPublic:
    """Return the session (with its transcript) a finding was flagged in."""
    finding = service.get_finding(session, finding_id)
    row = service.session_of(session, finding)
    return SessionPublic.of(row, service.transcript(session, row.id))


@admin_router.post("/findings/{finding_id}/triage", response_model=FindingPublic)
async def triage(
    finding_id: str, body: TriageRequest, state: StateDep, admin: FindingTriager, audit: AuditDep
) -> FindingPublic:
    """Acknowledge a finding, dispute it (with a reason) or mark it fixed in a later version."""

    def _triage() -> FindingPublic:
        with state.db.session() as session:
            finding = service.get_finding(session, finding_id)
            require_independent_review(session, admin, audit, finding.grant_id, "findings")
            row = service.triage_finding(
                session,
                finding_id,
                service.Triage(body.status, body.reason, body.fixed_in),
                actor=admin.name,
                role=admin.role,
            )
            return FindingPublic.of(row)

    audit.detail["finding_id"] = finding_id
    return await run_in_threadpool(_triage)
