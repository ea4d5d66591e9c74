"""In-process job runner: long-lived worker threads claim queued jobs from the database.

Each worker is one thread for its whole life, so torch work inside a handler keeps a single
OpenMP pool per worker (see docs/architecture.md, "One torch thread per kind of work").
A heartbeat thread marks the jobs this runner holds; jobs whose runner died (stale heartbeat,
or none) are re-queued from their checkpoint when the handler is resumable, else failed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any, Protocol

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from airlock.db import Database, new_id, utcnow
from airlock.errors import AirlockError
from airlock.jobs.executor import ExecutionLost, InProcessExecutor, JobExecutor
from airlock.jobs.models import Job
from airlock.jobs.service import JOBS_CHANNEL, add_event
from airlock.signals import emit

log = logging.getLogger(__name__)

RESTART_REASON = "interrupted by a server restart"


class JobCancelled(Exception):
    """Raised by a handler (or ``JobContext.raise_if_cancelled``) to end its job as cancelled."""


class JobContext:
    """What a handler sees of its job: params, checkpoint, and ways to report back.

    It talks to the database only, never to the runner, so it works the same on the runner's
    thread and on another machine (a Ray worker): the database is the job's one source of truth.
    Every write is fenced by the claim (runner id and attempt), so a run the runner has given up
    on (its node died, the job was re-queued) can no longer move the job.
    """

    def __init__(
        self,
        db: Database,
        job_id: str,
        params: dict[str, Any],
        checkpoint: dict[str, Any] | None,
        *,
        runner_id: str | None = None,
        attempt: int | None = None,
        stopping: Callable[[], bool] | None = None,
    ) -> None:
        self.job_id = job_id
        self.params = params
        self.checkpoint = checkpoint
        self.db = db
        self.runner_id = runner_id
        self.attempt = attempt
        self._stopping = stopping or (lambda: False)
        self._cancel_checked = 0.0
        self._cancel_flag = False

    def _fence(self) -> list[Any]:
        where: list[Any] = [Job.id == self.job_id]
        if self.runner_id is not None:
            where += [Job.worker_id == self.runner_id, Job.status == "running"]
        if self.attempt is not None:
            where.append(Job.attempts == self.attempt)
        return where

    def _set(self, **values: Any) -> None:
        with self.db.session() as session:
            done = session.execute(update(Job).where(*self._fence()).values(**values))
            if self.runner_id is not None and getattr(done, "rowcount", 0) != 1:
                # The claim this run holds is gone (re-queued after its node died, or finished).
                raise JobCancelled()

    def emit(self, message: str, **data: Any) -> None:
        """Append a message event to the job's log."""
        with self.db.session() as session:
            add_event(session, self.job_id, message, type="message", **data)

    def metrics(self, step: int, **values: float) -> None:
        """Append a metrics event (e.g. ``train_loss``) for training step ``step``."""
        with self.db.session() as session:
            add_event(session, self.job_id, f"step {step}", type="metrics", step=step, **values)

    def save_checkpoint(self, data: dict[str, Any]) -> None:
        """Persist ``data`` as the job's checkpoint now; a resumed run receives it back."""
        self._set(checkpoint=dict(data))
        self.checkpoint = dict(data)

    def progress(self, fraction: float) -> None:
        """Record progress between 0 and 1."""
        self._set(progress=min(1.0, max(0.0, float(fraction))))

    def runner_stopping(self) -> bool:
        """Return whether the runner that claimed the job is shutting down (the job will be re-queued)."""
        return self._stopping()

    def cancelled(self) -> bool:
        """Return whether the job should stop (a cancel request, or the runner shutting down)."""
        if self._cancel_flag or self._stopping():
            return True
        now = time.monotonic()
        # Reading the flag at most every 0.1 s keeps a tight training loop cheap.
        if now - self._cancel_checked >= 0.1:
            self._cancel_checked = now
            with self.db.session() as session:
                self._cancel_flag = bool(session.scalar(select(Job.cancel_requested).where(Job.id == self.job_id)))
        return self._cancel_flag

    def raise_if_cancelled(self) -> None:
        """Raise ``JobCancelled`` when ``cancelled()`` is true."""
        if self.cancelled():
            raise JobCancelled()


def _resume_point(checkpoint: dict[str, Any] | None) -> str:
    """Describe where a re-queued job resumes, from the same record its handler resumes from."""
    if not checkpoint:
        return "from the start"
    step = checkpoint.get("step")
    return f"from step-{step}" if step is not None else "from its last checkpoint"


class JobHandler(Protocol):
    """Runs jobs of one kind; ``resumable`` handlers continue from ``ctx.checkpoint`` after a restart.

    A handler may also define ``on_finished(session, job)``: called once when the job reaches a
    terminal state, in that transition's transaction, so what it writes (e.g. a ledger event)
    commits with the state change or not at all. The runner itself knows no job kind.
    """

    resumable: bool

    def run(self, ctx: JobContext) -> dict[str, Any]:
        """Do the work and return the job's result."""
        ...


class JobRunner:
    """A pool of worker threads over the database-backed queue."""

    def __init__(
        self,
        db: Database,
        handlers: Mapping[str, JobHandler],
        workers: int = 1,
        poll_interval: float = 2.0,
        *,
        stale_after: float = 30.0,
        max_attempts: int = 3,
        executor: JobExecutor | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError("a runner needs at least one worker")
        self.db = db
        self.handlers = dict(handlers)
        self.workers = workers
        self.poll_interval = poll_interval
        self.stale_after = stale_after
        self.max_attempts = max_attempts
        self.executor: JobExecutor = executor or InProcessExecutor()
        self.runner_id = new_id("runner")
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._unsubscribe: Any = None
        self._threads: list[threading.Thread] = []

    @property
    def stopping(self) -> bool:
        """Whether ``stop()`` has been called."""
        return self._stop.is_set()

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Recover jobs left running by a dead process, then start the workers and the heartbeat."""
        if self._threads:
            raise RuntimeError("runner already started")
        self._stop.clear()
        # A queued job wakes an idle worker at once (in this process directly, in others through the
        # database's signal); the poll is only the fallback for a missed signal.
        self._unsubscribe = self.db.signals.subscribe(JOBS_CHANNEL, self._wake.set)
        self.recover()
        for n in range(self.workers):
            thread = threading.Thread(target=self._work, name=f"airlock-job-worker-{n}", daemon=True)
            thread.start()
            self._threads.append(thread)
        beat = threading.Thread(target=self._heartbeat, name="airlock-job-heartbeat", daemon=True)
        beat.start()
        self._threads.append(beat)

    def stop(self, timeout: float = 30.0) -> None:
        """Ask running handlers to stop (resumable jobs are re-queued) and join the threads."""
        self._stop.set()
        self._wake.set()
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        self._threads = []

    # ---------------------------------------------------------------- recovery

    def recover(self) -> list[str]:
        """Re-queue or fail running jobs of known kinds whose runner is gone; return their ids.

        A job counts as orphaned when its heartbeat is missing or older than ``stale_after``: its
        process died (a restart), while a live runner keeps its own jobs' heartbeats fresh.
        """
        cutoff = utcnow() - timedelta(seconds=self.stale_after)
        recovered: list[str] = []
        with self.db.session() as session:
            rows = session.execute(
                select(Job.id, Job.kind, Job.attempts, Job.checkpoint).where(
                    Job.status == "running",
                    Job.kind.in_(self.handlers),
                    or_(Job.worker_id.is_(None), Job.worker_id != self.runner_id),
                    or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < cutoff),
                )
            ).all()
        for job_id, kind, attempts, checkpoint in rows:
            resumable = bool(getattr(self.handlers[kind], "resumable", False))
            with self.db.session() as session:
                if resumable and attempts < self.max_attempts:
                    values: dict[str, Any] = {"status": "queued", "worker_id": None, "heartbeat_at": None}
                    status, where = "queued", _resume_point(checkpoint)
                    message = f"{RESTART_REASON}; re-queued to resume {where}"
                else:
                    reason = f"{RESTART_REASON} ({attempts} attempts)" if resumable else RESTART_REASON
                    values = {
                        "status": "failed",
                        "finished_at": utcnow(),
                        "error": {"code": "interrupted", "message": reason},
                    }
                    status, message = "failed", reason
                claimed = session.execute(
                    update(Job)
                    .where(
                        Job.id == job_id,
                        Job.status == "running",
                        or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < cutoff),
                    )
                    .values(**values)
                )
                if getattr(claimed, "rowcount", 0) != 1:
                    continue  # another runner recovered it first, or its owner is alive after all
                add_event(session, job_id, message, type="status", status=status)
                if status == "failed":
                    self._on_finished(session, job_id)
            log.warning("job %s: %s", job_id, message)
            recovered.append(job_id)
        return recovered

    def _heartbeat(self) -> None:
        interval = max(0.05, self.stale_after / 3)
        while not self._stop.wait(interval):
            try:
                with self.db.session() as session:
                    session.execute(
                        update(Job)
                        .where(Job.worker_id == self.runner_id, Job.status == "running")
                        .values(heartbeat_at=utcnow())
                    )
                self.recover()
            except Exception:  # a database hiccup must not kill the heartbeat
                log.exception("job heartbeat failed")

    # ---------------------------------------------------------------- workers

    def _claim(self, session: Session) -> Job | None:
        candidates = session.scalars(
            select(Job.id)
            .where(Job.status == "queued", Job.kind.in_(self.handlers))
            .order_by(Job.created_at, Job.id)
            .limit(8)
        ).all()
        for job_id in candidates:
            # The conditional UPDATE is the lock: only one runner sees rowcount 1 for a job.
            result = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == "queued")
                .values(
                    status="running",
                    worker_id=self.runner_id,
                    heartbeat_at=utcnow(),
                    started_at=utcnow(),
                    attempts=Job.attempts + 1,
                )
            )
            if getattr(result, "rowcount", 0) == 1:
                job = session.get(Job, job_id, populate_existing=True)
                assert job is not None
                resumed = job.attempts > 1
                add_event(
                    session,
                    job_id,
                    f"job resumed (attempt {job.attempts})" if resumed else "job started",
                    type="status",
                    status="running",
                )
                return job
        return None

    def run_once(self) -> bool:
        """Claim and run one queued job on the calling thread; return whether there was one."""
        with self.db.session() as session:
            job = self._claim(session)
            if job is None:
                return False
            job_id, kind, params, checkpoint = job.id, job.kind, dict(job.params), job.checkpoint
            attempt = job.attempts
        self._execute(job_id, kind, params, checkpoint, attempt)
        return True

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                ran = self.run_once()
            except Exception:
                log.exception("job worker failed to claim a job")
                ran = False
            if not ran:
                self._wake.wait(self.poll_interval)
                self._wake.clear()

    def _execute(
        self, job_id: str, kind: str, params: dict[str, Any], checkpoint: dict[str, Any] | None, attempt: int
    ) -> None:
        handler = self.handlers[kind]
        ctx = JobContext(
            self.db,
            job_id,
            params,
            checkpoint,
            runner_id=self.runner_id,
            attempt=attempt,
            stopping=lambda: self.stopping,
        )
        try:
            result = self.executor.execute(kind, handler, ctx)
        except ExecutionLost as exc:
            self._lost(job_id, handler, str(exc))
            return
        except JobCancelled:
            if self.stopping and not ctx._cancel_flag and not self._cancel_requested(job_id):
                self._interrupted_by_shutdown(job_id, handler)
            else:
                self._finish(job_id, "cancelled", message="job cancelled")
            return
        except AirlockError as exc:
            error = {"code": exc.code or exc.error_type, "message": exc.message}
            self._finish(job_id, "failed", error=error, message=f"job failed: {exc.message}")
            return
        except Exception as exc:
            log.exception("job %s (%s) failed", job_id, kind)
            error = {"code": "internal_error", "message": f"{type(exc).__name__}: {exc}"}
            self._finish(job_id, "failed", error=error, message=f"job failed: {error['message']}")
            return
        try:
            self._finish(job_id, "succeeded", result=dict(result), message="job succeeded")
        except Exception as exc:  # e.g. a result that is not JSON: the job must still end
            log.exception("job %s: could not store its result", job_id)
            error = {"code": "internal_error", "message": f"could not store the result: {exc}"}
            self._finish(job_id, "failed", error=error, message=f"job failed: {error['message']}")

    def _lost(self, job_id: str, handler: JobHandler, reason: str) -> None:
        """Re-queue (resumable, attempts left) or fail a job whose executing node or worker died."""
        with self.db.session() as session:
            job = session.get(Job, job_id)
            attempts = job.attempts if job is not None else self.max_attempts
            checkpoint = job.checkpoint if job is not None else None
        if getattr(handler, "resumable", False) and attempts < self.max_attempts:
            with self.db.session() as session:
                requeued = session.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.worker_id == self.runner_id, Job.status == "running")
                    .values(status="queued", worker_id=None, heartbeat_at=None)
                )
                if getattr(requeued, "rowcount", 0) == 1:
                    message = f"{reason}; re-queued to resume {_resume_point(checkpoint)}"
                    add_event(session, job_id, message, type="status", status="queued")
                    emit(session, JOBS_CHANNEL)
                    log.warning("job %s: %s", job_id, message)
            return
        message = f"{reason} ({attempts} attempts)" if getattr(handler, "resumable", False) else reason
        error = {"code": "worker_lost", "message": message}
        self._finish(job_id, "failed", error=error, message=f"job failed: {message}")

    def _cancel_requested(self, job_id: str) -> bool:
        with self.db.session() as session:
            return bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))

    def _interrupted_by_shutdown(self, job_id: str, handler: JobHandler) -> None:
        if getattr(handler, "resumable", False):
            with self.db.session() as session:
                session.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.worker_id == self.runner_id, Job.status == "running")
                    .values(status="queued", worker_id=None, heartbeat_at=None)
                )
                add_event(session, job_id, "server shutting down; re-queued to resume", type="status", status="queued")
        else:
            error = {"code": "interrupted", "message": "interrupted by a server shutdown"}
            self._finish(job_id, "failed", error=error, message=error["message"])

    def _finish(
        self,
        job_id: str,
        status: str,
        *,
        message: str,
        result: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
    ) -> None:
        values: dict[str, Any] = {"status": status, "finished_at": utcnow(), "result": result, "error": error}
        if status == "succeeded":
            values["progress"] = 1.0
        with self.db.session() as session:
            done = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == "running", Job.worker_id == self.runner_id)
                .values(**values)
            )
            if getattr(done, "rowcount", 0) != 1:
                # Our heartbeat went stale and another runner recovered the job; its outcome wins.
                log.warning("job %s was taken over by another runner; dropping the %s outcome", job_id, status)
                return
            data: dict[str, Any] = {"status": status}
            if error is not None:
                data["error"] = error
            add_event(session, job_id, message, type="status", **data)
            self._on_finished(session, job_id)

    def _on_finished(self, session: Session, job_id: str) -> None:
        """Let the job's handler react to its terminal state inside the same transaction (e.g. log it)."""
        job = session.get(Job, job_id)
        hook = getattr(self.handlers.get(job.kind), "on_finished", None) if job is not None else None
        if job is not None and hook is not None:
            session.flush()
            hook(session, job)
