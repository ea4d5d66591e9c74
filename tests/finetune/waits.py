"""Waits on a job's progress, not on the wall clock: a slow machine is fine, a stalled job is not."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import func, select

from airlock.db import Database
from airlock.jobs import service
from airlock.jobs.models import Job, JobEvent

# How long a job may show no sign of life (no new event, progress, status or checkpoint) before a
# wait gives up. Generous: it only bounds a job that is truly stuck, never a slow one.
STALL_S = 180.0


def wait_on_progress(
    db: Database, job_id: str, done: Callable[[Job], bool], *, stall_s: float = STALL_S, poll_s: float = 0.05
) -> Job:
    """Return the job once ``done(job)`` holds; raise if it stops making progress for ``stall_s``."""
    last: tuple[Any, ...] | None = None
    changed = time.monotonic()
    while True:
        with db.session() as session:
            job = service.get_job(session, job_id)
            if done(job):
                session.expunge(job)
                return job
            events = session.scalar(select(func.count()).select_from(JobEvent).where(JobEvent.job_id == job_id))
            sign = (job.status, job.progress, repr(job.checkpoint), events)
        if sign != last:
            last, changed = sign, time.monotonic()
        elif time.monotonic() - changed > stall_s:
            raise TimeoutError(f"job {job_id} made no progress for {stall_s:.0f} s (last seen: {sign})")
        time.sleep(poll_s)


def wait_for_status(db: Database, job_id: str, statuses: set[str], *, stall_s: float = STALL_S) -> Job:
    """Return the job once its status is one of ``statuses``."""
    return wait_on_progress(db, job_id, lambda job: job.status in statuses, stall_s=stall_s)


def wait_for_recorded_checkpoint(db: Database, job_id: str) -> Job:
    """Return the job once it has recorded a checkpoint (failing at once if it ends without one)."""

    def done(job: Job) -> bool:
        if job.checkpoint:
            return True
        if job.status in ("succeeded", "failed", "cancelled"):
            raise AssertionError(f"job {job_id} ended {job.status} without recording a checkpoint: {job.error}")
        return False

    return wait_on_progress(db, job_id, done)
