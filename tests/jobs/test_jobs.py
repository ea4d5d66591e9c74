"""The job system: lifecycle, failures, cancel, restart recovery and exclusive claims (SQLite + PostgreSQL)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import update

from airlock.db import Database, utcnow
from airlock.errors import ConflictError, InvalidRequestError, NotFoundError
from airlock.jobs import service
from airlock.jobs.models import Job, JobEvent
from airlock.jobs.runner import RESTART_REASON, JobCancelled, JobContext, JobHandler, JobRunner


class FnHandler:
    """A handler around a function, for tests."""

    def __init__(self, fn: Callable[[JobContext], dict[str, Any]], *, resumable: bool = False) -> None:
        self.fn = fn
        self.resumable = resumable

    def run(self, ctx: JobContext) -> dict[str, Any]:
        return self.fn(ctx)


@contextmanager
def running(db: Database, handlers: dict[str, JobHandler], **kwargs: Any) -> Iterator[JobRunner]:
    kwargs.setdefault("poll_interval", 0.02)
    runner = JobRunner(db, handlers, **kwargs)
    runner.start()
    try:
        yield runner
    finally:
        runner.stop(timeout=10)


def enqueue(db: Database, kind: str = "echo", **params: Any) -> str:
    with db.session() as session:
        return service.enqueue(session, kind, evaluator_id="evalr_x", grant_id="grant_x", params=params).id


def wait_for(db: Database, job_id: str, *statuses: str, timeout: float = 15.0) -> Job:
    deadline = time.monotonic() + timeout
    while True:
        with db.session() as session:
            job = service.get_job(session, job_id)
            if job.status in statuses:
                return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} is {job.status}, not {statuses}")
        time.sleep(0.02)


def events(db: Database, job_id: str) -> list[JobEvent]:
    with db.session() as session:
        return service.list_events(session, job_id, limit=1000)[0]


def statuses(db: Database, job_id: str) -> list[str]:
    return [e.data["status"] for e in events(db, job_id) if e.type == "status"]


def _echo(ctx: JobContext) -> dict[str, Any]:
    ctx.emit("hello", stage="start")
    for step in range(1, 4):
        ctx.metrics(step, train_loss=1.0 / step)
        ctx.progress(step / 3)
    return {"echo": ctx.params.get("text")}


def test_lifecycle_with_events(db: Database) -> None:
    job_id = enqueue(db, text="hi")
    with db.session() as session:
        job = service.get_job(session, job_id)
        assert job.id.startswith("job_") and job.status == "queued" and job.attempts == 0
    with running(db, {"echo": FnHandler(_echo)}):
        job = wait_for(db, job_id, "succeeded")
    assert job.result == {"echo": "hi"} and job.error is None and job.progress == 1.0 and job.attempts == 1
    assert job.started_at is not None and job.finished_at is not None and job.finished_at >= job.started_at
    assert statuses(db, job_id) == ["queued", "running", "succeeded"]
    evs = events(db, job_id)
    assert [e.message for e in evs if e.type == "message"] == ["hello"]
    assert next(e.data for e in evs if e.type == "metrics") == {"step": 1, "train_loss": 1.0}
    assert len([e for e in evs if e.type == "metrics"]) == 3
    ids = [e.id for e in evs]
    assert ids == sorted(ids)
    with db.session() as session:
        page, more = service.list_events(session, job_id, after=ids[1], limit=2)
        assert [e.id for e in page] == ids[2:4] and more


def test_failures_are_recorded_with_codes(db: Database) -> None:
    def boom(ctx: JobContext) -> dict[str, Any]:
        raise ValueError("kaput")

    def denied(ctx: JobContext) -> dict[str, Any]:
        raise InvalidRequestError("line 3: bad", code="invalid_file_format")

    def not_json(ctx: JobContext) -> dict[str, Any]:
        return {"x": object()}

    handlers: dict[str, JobHandler] = {"boom": FnHandler(boom), "denied": FnHandler(denied), "nj": FnHandler(not_json)}
    a, b, c = enqueue(db, "boom"), enqueue(db, "denied"), enqueue(db, "nj")
    with running(db, handlers):
        ja, jb, jc = (wait_for(db, j, "failed") for j in (a, b, c))
    assert ja.error == {"code": "internal_error", "message": "ValueError: kaput"}
    assert jb.error == {"code": "invalid_file_format", "message": "line 3: bad"}
    assert jc.error is not None and jc.error["code"] == "internal_error" and jc.result is None
    assert statuses(db, a) == ["queued", "running", "failed"]
    assert events(db, a)[-1].data["error"]["message"] == "ValueError: kaput"


def test_cancel_queued_job_is_immediate(db: Database) -> None:
    job_id = enqueue(db)
    with db.session() as session:
        job = service.request_cancel(session, job_id)
        assert job.status == "cancelled" and job.finished_at is not None
    with running(db, {"echo": FnHandler(_echo)}):
        time.sleep(0.2)
    assert wait_for(db, job_id, "cancelled").attempts == 0  # never ran
    assert statuses(db, job_id) == ["queued", "cancelled"]
    with db.session() as session, pytest.raises(ConflictError):
        service.request_cancel(session, job_id)


def test_cancel_running_job_stops_within_a_second(db: Database) -> None:
    started = threading.Event()

    def loop(ctx: JobContext) -> dict[str, Any]:
        started.set()
        while True:
            if ctx.cancelled():
                raise JobCancelled()
            time.sleep(0.01)

    job_id = enqueue(db, "loop")
    with running(db, {"loop": FnHandler(loop)}):
        assert started.wait(10)
        with db.session() as session:
            job = service.request_cancel(session, job_id)
            assert job.status == "running" and job.cancel_requested
        t0 = time.monotonic()
        job = wait_for(db, job_id, "cancelled", timeout=5)
        assert time.monotonic() - t0 < 1.0
    assert statuses(db, job_id) == ["queued", "running", "cancelled"]
    assert any(e.message == "cancellation requested" for e in events(db, job_id))


def _crash(db: Database, job_id: str, checkpoint: dict[str, Any] | None) -> None:
    """Make the job look like a dead process was running it."""
    with db.session() as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(
                status="running",
                attempts=1,
                checkpoint=checkpoint,
                worker_id="runner_dead",
                started_at=utcnow(),
                heartbeat_at=utcnow() - timedelta(minutes=5),
            )
        )


def test_restart_resumes_resumable_job_from_checkpoint(db: Database) -> None:
    seen: list[dict[str, Any] | None] = []

    def train(ctx: JobContext) -> dict[str, Any]:
        seen.append(ctx.checkpoint)
        start = (ctx.checkpoint or {}).get("step", 0)
        for step in range(start + 1, 6):
            ctx.save_checkpoint({"step": step})
        return {"steps_run": 5 - start}

    job_id = enqueue(db, "train")
    _crash(db, job_id, {"step": 3})
    with running(db, {"train": FnHandler(train, resumable=True)}):
        job = wait_for(db, job_id, "succeeded")
    assert seen == [{"step": 3}]
    assert job.result == {"steps_run": 2} and job.checkpoint == {"step": 5} and job.attempts == 2
    assert statuses(db, job_id) == ["queued", "queued", "running", "succeeded"]
    requeued = [e for e in events(db, job_id) if e.type == "status"][1]
    assert requeued.message == f"{RESTART_REASON}; re-queued to resume from step-3"


def test_restart_fails_non_resumable_job_with_reason(db: Database) -> None:
    job_id = enqueue(db)
    _crash(db, job_id, None)
    with running(db, {"echo": FnHandler(_echo)}):
        job = wait_for(db, job_id, "failed")
    assert job.error == {"code": "interrupted", "message": RESTART_REASON}
    assert job.finished_at is not None
    assert statuses(db, job_id) == ["queued", "failed"]


def test_live_runner_keeps_its_job_and_dead_one_is_recovered_by_heartbeat(db: Database) -> None:
    release = threading.Event()

    def slow(ctx: JobContext) -> dict[str, Any]:
        release.wait(10)
        return {}

    job_id = enqueue(db, "slow")
    with running(db, {"slow": FnHandler(slow)}, stale_after=0.3):
        wait_for(db, job_id, "running")
        # A second runner starting now must not steal a job whose owner's heartbeat is fresh.
        with running(db, {"slow": FnHandler(slow)}, stale_after=0.3) as other:
            time.sleep(0.5)
            assert other.recover() == []
            with db.session() as session:
                assert service.get_job(session, job_id).status == "running"
            release.set()
            assert wait_for(db, job_id, "succeeded").attempts == 1
    # A job whose runner died mid-flight is recovered by a live runner's periodic check.
    orphan = enqueue(db)
    with running(db, {"echo": FnHandler(_echo)}, stale_after=0.3):
        _crash(db, orphan, None)
        assert wait_for(db, orphan, "failed").error == {"code": "interrupted", "message": RESTART_REASON}


def test_graceful_stop_requeues_resumable_job(db: Database) -> None:
    started = threading.Event()

    def loop(ctx: JobContext) -> dict[str, Any]:
        ctx.save_checkpoint({"step": 1})
        started.set()
        while not ctx.cancelled():
            time.sleep(0.01)
        raise JobCancelled()

    job_id = enqueue(db, "loop")
    runner = JobRunner(db, {"loop": FnHandler(loop, resumable=True)}, poll_interval=0.02)
    runner.start()
    assert started.wait(10)
    runner.stop(timeout=10)
    job = wait_for(db, job_id, "queued")
    assert job.checkpoint == {"step": 1} and not job.cancel_requested


def test_two_runners_never_run_a_job_twice(db: Database) -> None:
    runs: Counter[str] = Counter()
    lock = threading.Lock()

    def count(ctx: JobContext) -> dict[str, Any]:
        with lock:
            runs[ctx.job_id] += 1
        time.sleep(0.005)
        return {}

    job_ids = [enqueue(db, "count") for _ in range(30)]
    handler = FnHandler(count)
    with (
        running(db, {"count": handler}, workers=3, poll_interval=0.005),
        running(db, {"count": handler}, workers=3, poll_interval=0.005),
    ):
        for job_id in job_ids:
            assert wait_for(db, job_id, "succeeded", timeout=30).attempts == 1
    assert runs == Counter(dict.fromkeys(job_ids, 1))


def test_unknown_kinds_are_left_alone(db: Database) -> None:
    job_id = enqueue(db, "other")
    with running(db, {"echo": FnHandler(_echo)}):
        time.sleep(0.2)
    with db.session() as session:
        assert service.get_job(session, job_id).status == "queued"


def test_list_jobs_cursor_paging_and_isolation(db: Database) -> None:
    with db.session() as session:
        mine = [
            service.enqueue(session, "ft", evaluator_id="evalr_a", grant_id="g", params={}, id_prefix="ftjob").id
            for _ in range(5)
        ]
        service.enqueue(session, "ft", evaluator_id="evalr_b", grant_id="g", params={}, id_prefix="ftjob")
    assert all(j.startswith("ftjob_") for j in mine)
    with db.session() as session:
        first, more = service.list_jobs(session, "evalr_a", limit=2)
        assert more and len(first) == 2
        second, more = service.list_jobs(session, "evalr_a", after=first[-1].id, limit=2)
        third, more3 = service.list_jobs(session, "evalr_a", after=second[-1].id, limit=2)
        paged = [j.id for j in first + second + third]
        assert more and not more3 and sorted(paged) == sorted(mine) and len(set(paged)) == 5
        created = [j.created_at for j in first + second + third]
        assert created == sorted(created, reverse=True)
        with pytest.raises(NotFoundError):
            service.get_job(session, mine[0], evaluator_id="evalr_b")
        with pytest.raises(NotFoundError):
            service.request_cancel(session, mine[0], evaluator_id="evalr_b")


@pytest.mark.parametrize("writer", ["same process", "another process"])
def test_a_queued_job_wakes_an_idle_runner(db: Database, writer: str) -> None:
    """The poll is only a fallback: a runner polling once a minute still starts a new job at once."""
    other = Database(db.url) if writer == "another process" else db
    try:
        with running(db, {"echo": FnHandler(lambda ctx: {"ok": True})}, poll_interval=600):
            time.sleep(0.1)  # let the worker find the queue empty and go idle
            job_id = enqueue(other)
            job = wait_for(db, job_id, "succeeded", timeout=30)
        assert job.result == {"ok": True}
    finally:
        if other is not db:
            other.dispose()
