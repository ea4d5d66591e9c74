"""HTTP routes of the interp package: evaluators submit and follow jobs; lab reviewers release results."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse, Response

from airlock.access.roles import Permission
from airlock.access.service import AdminPrincipal
from airlock.deps import (
    AuditDep,
    CurrentPrincipal,
    SessionDep,
    StateDep,
    require,
    require_independent_review,
)
from airlock.interp import service
from airlock.interp.schemas import (
    InterpEvent,
    InterpEventList,
    InterpJobCreate,
    InterpJobList,
    InterpJobPublic,
    InterpResult,
    ReviewDecision,
    ReviewItem,
    ReviewList,
)
from airlock.jobs import service as jobs_service

router = APIRouter(prefix="/v1/airlock/interp", tags=["evaluator: interp"])


@router.post("/jobs", response_model=InterpJobPublic)
def create_job(
    body: InterpJobCreate, state: StateDep, session: SessionDep, principal: CurrentPrincipal, audit: AuditDep
) -> InterpJobPublic:
    """Queue code to run in a sandbox against a granted variant's weights (needs the `interp` scope)."""
    audit.scope = "interp"
    audit.model = body.model
    job = service.create_job(session, state.settings, principal, body)
    job_, row = service.get_own_job(session, principal, job.id)
    audit.detail.update(
        {"job_id": job.id, "code_sha256": row.code_sha256, "code_bytes": row.code_bytes, "entry_point": row.entry_point}
    )
    return service.to_public(job_, row)


@router.get("/jobs", response_model=InterpJobList)
def list_jobs(
    session: SessionDep,
    principal: CurrentPrincipal,
    audit: AuditDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> InterpJobList:
    """List your grant's interp jobs, newest first (cursor paging with `after`)."""
    audit.scope = "interp"
    rows, has_more = service.list_own_jobs(session, principal, after=after, limit=limit)
    return InterpJobList(data=[service.to_public(job, row) for job, row in rows], has_more=has_more)


@router.get("/jobs/{job_id}", response_model=InterpJobPublic)
def get_job(job_id: str, session: SessionDep, principal: CurrentPrincipal, audit: AuditDep) -> InterpJobPublic:
    """Status, logs the runner printed, and resource use of one of your jobs."""
    audit.scope = "interp"
    audit.detail["job_id"] = job_id
    return service.to_public(*service.get_own_job(session, principal, job_id))


@router.get("/jobs/{job_id}/events", response_model=InterpEventList)
def job_events(
    job_id: str,
    session: SessionDep,
    principal: CurrentPrincipal,
    audit: AuditDep,
    after: int | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> InterpEventList:
    """Progress events of a job, oldest first (``after``: the last event id seen)."""
    audit.scope = "interp"
    service.get_own_job(session, principal, job_id)
    events, has_more = jobs_service.list_events(session, job_id, after=after, limit=limit)
    return InterpEventList(
        data=[InterpEvent(id=e.id, created_at=e.ts, type=e.type, message=e.message, data=e.data or {}) for e in events],
        has_more=has_more,
    )


@router.get("/jobs/{job_id}/result", response_model=InterpResult)
def get_result(
    job_id: str, state: StateDep, session: SessionDep, principal: CurrentPrincipal, audit: AuditDep
) -> InterpResult:
    """Return the released result: JSON values, with arrays listed (fetch them from ``npz_path``)."""
    audit.scope = "interp"
    audit.detail["job_id"] = job_id
    job, row = service.get_own_job(session, principal, job_id)
    result = service.released_result(state.settings.artifacts_dir, job, row)
    audit.detail["result_bytes"] = result.result_bytes
    return result


@router.get("/jobs/{job_id}/result.npz", response_class=FileResponse)
def get_result_arrays(
    job_id: str, state: StateDep, session: SessionDep, principal: CurrentPrincipal, audit: AuditDep
) -> Response:
    """Return the released result's arrays as one NPZ file."""
    audit.scope = "interp"
    audit.detail["job_id"] = job_id
    job, row = service.get_own_job(session, principal, job_id)
    path = service.released_npz(state.settings.artifacts_dir, job, row)
    audit.detail["result_bytes"] = row.result_bytes
    if service.keeps_content(session, row):
        return FileResponse(path, media_type="application/octet-stream", filename=f"{job_id}.npz")
    # Under "none" retention the arrays are the result's last read: served from memory, then deleted
    # with the JSON document and the logs once this request commits.
    data = path.read_bytes()
    service.forget_result(session, state.settings.artifacts_dir, job, row)
    disposition = {"Content-Disposition": f'attachment; filename="{job_id}.npz"'}
    return Response(content=data, media_type="application/octet-stream", headers=disposition)


@router.post("/jobs/{job_id}/cancel", response_model=InterpJobPublic)
def cancel_job(job_id: str, session: SessionDep, principal: CurrentPrincipal, audit: AuditDep) -> InterpJobPublic:
    """Cancel a queued or running job (a running runner is killed within a second)."""
    audit.scope = "interp"
    audit.detail["job_id"] = job_id
    service.get_own_job(session, principal, job_id)
    jobs_service.request_cancel(session, job_id)
    return service.to_public(*service.get_own_job(session, principal, job_id))


# ---------------------------------------------------------------------------------- lab review


@router.get("/review", response_model=ReviewList, tags=["lab: interp review"])
def review_queue(
    session: SessionDep,
    admin: Annotated[AdminPrincipal, require(Permission.INTERP_REVIEW_READ)],
    audit: AuditDep,
    state: Annotated[str | None, Query(description="Review state; `pending` by default, `all` for every job.")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> ReviewList:
    """Interp jobs for the lab's reviewers: held results by default, with code and arguments."""
    audit.scope = "interp_review"
    wanted = None if state == "all" else (state or "pending")
    return ReviewList(
        data=[service.to_review_item(j, r) for j, r in service.list_for_review(session, state=wanted, limit=limit)]
    )


@router.get("/review/{job_id}", response_model=ReviewItem, tags=["lab: interp review"])
def review_item(
    job_id: str,
    session: SessionDep,
    admin: Annotated[AdminPrincipal, require(Permission.INTERP_REVIEW_READ)],
    audit: AuditDep,
) -> ReviewItem:
    """One interp job with its code, arguments and logs."""
    audit.scope = "interp_review"
    audit.detail["job_id"] = job_id
    return service.to_review_item(*service.get_job_for_lab(session, job_id))


@router.post("/review/{job_id}", response_model=ReviewItem, tags=["lab: interp review"])
def review_decide(
    job_id: str,
    body: ReviewDecision,
    state: StateDep,
    session: SessionDep,
    admin: Annotated[AdminPrincipal, require(Permission.INTERP_REVIEW_DECIDE)],
    audit: AuditDep,
) -> ReviewItem:
    """Approve or deny (with a reason) a held result; not by the token that issued the job's grant."""
    audit.scope = "interp_review"
    audit.detail.update({"job_id": job_id, "decision": body.decision})
    _job, held = service.get_job_for_lab(session, job_id)
    require_independent_review(session, admin, audit, held.grant_id, f"interp job {job_id}")
    job, row = service.decide(session, job_id, reviewer=admin.name, decision=body.decision, reason=body.reason)
    item = service.to_review_item(job, row)
    if body.decision == "deny":
        # Commit first: a failed commit must leave the held result intact, not deleted but pending.
        session.commit()
        service.discard_result(state.settings.artifacts_dir, job_id)
    return item
