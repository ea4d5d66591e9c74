"""Job logic with no HTTP: enqueue, look up, page, cancel, and the event log."""

from __future__ import annotations

from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from airlock.db import new_id, utcnow
from airlock.errors import ConflictError, InvalidRequestError, NotFoundError
from airlock.jobs.models import EVENT_TYPES, TERMINAL_STATUSES, Job, JobEvent
from airlock.signals import emit

MAX_PAGE = 100
JOBS_CHANNEL = "airlock_jobs"
"""Signalled when a job is queued, so idle runners in every process claim it at once."""


def enqueue(
    session: Session,
    kind: str,
    *,
    evaluator_id: str | None,
    grant_id: str | None,
    params: dict[str, Any],
    id_prefix: str = "job",
) -> Job:
    """Create a queued job of ``kind`` and record its first status event."""
    job = Job(
        id=new_id(id_prefix),
        kind=kind,
        evaluator_id=evaluator_id,
        grant_id=grant_id,
        status="queued",
        params=dict(params),
        created_at=utcnow(),
    )
    session.add(job)
    session.flush()
    add_event(session, job.id, "job queued", type="status", status="queued")
    emit(session, JOBS_CHANNEL)
    return job


def get_job(session: Session, job_id: str, *, evaluator_id: str | None = None) -> Job:
    """Return a job; with ``evaluator_id``, another organisation's job is a 404 too."""
    job = session.get(Job, job_id)
    if job is None or (evaluator_id is not None and job.evaluator_id != evaluator_id):
        raise NotFoundError(f"job {job_id!r} does not exist")
    return job


def list_jobs(
    session: Session,
    evaluator_id: str | None,
    *,
    after: str | None = None,
    limit: int = 20,
    kind: str | None = None,
) -> tuple[list[Job], bool]:
    """Return one page of jobs, newest first, starting after the job id ``after``; and has_more."""
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidRequestError(f"limit must be between 1 and {MAX_PAGE}", param="limit")
    stmt = select(Job)
    if evaluator_id is not None:
        stmt = stmt.where(Job.evaluator_id == evaluator_id)
    if kind is not None:
        stmt = stmt.where(Job.kind == kind)
    if after is not None:
        cursor = get_job(session, after, evaluator_id=evaluator_id)
        # Ties on created_at are broken by id so that paging never skips or repeats a job.
        stmt = stmt.where(
            or_(
                Job.created_at < cursor.created_at,
                and_(Job.created_at == cursor.created_at, Job.id < cursor.id),
            )
        )
    rows = list(session.scalars(stmt.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def request_cancel(session: Session, job_id: str, *, evaluator_id: str | None = None) -> Job:
    """Cancel a queued job at once; flag a running one so its worker stops it."""
    job = get_job(session, job_id, evaluator_id=evaluator_id)
    if job.status in TERMINAL_STATUSES:
        raise ConflictError(f"job {job_id} is already {job.status}")
    # Conditional updates: the worker may claim the job between our read and our write.
    cancelled = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "queued")
        .values(status="cancelled", cancel_requested=True, finished_at=utcnow())
    )
    if getattr(cancelled, "rowcount", 0) == 1:
        add_event(session, job_id, "job cancelled before it started", type="status", status="cancelled")
    else:
        session.execute(update(Job).where(Job.id == job_id, Job.status == "running").values(cancel_requested=True))
        add_event(session, job_id, "cancellation requested", type="message")
    session.flush()
    session.refresh(job)
    return job


def add_event(session: Session, job_id: str, message: str, *, type: str = "message", **data: Any) -> JobEvent:
    """Append an event to a job's log."""
    if type not in EVENT_TYPES:
        raise ValueError(f"unknown job event type {type!r}")
    event = JobEvent(job_id=job_id, ts=utcnow(), type=type, message=message, data=data)
    session.add(event)
    session.flush()
    return event


def list_events(
    session: Session, job_id: str, *, after: int | None = None, limit: int = 100, newest_first: bool = False
) -> tuple[list[JobEvent], bool]:
    """Return a page of a job's events after event id ``after``, oldest first by default; and has_more."""
    if not 1 <= limit <= 1000:
        raise InvalidRequestError("limit must be between 1 and 1000", param="limit")
    stmt = select(JobEvent).where(JobEvent.job_id == job_id)
    if after is not None:
        stmt = stmt.where(JobEvent.id < after if newest_first else JobEvent.id > after)
    order = JobEvent.id.desc() if newest_first else JobEvent.id.asc()
    rows = list(session.scalars(stmt.order_by(order).limit(limit + 1)))
    return rows[:limit], len(rows) > limit
