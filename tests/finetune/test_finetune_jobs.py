"""Fine-tuning as a persistent job: events, cancel, and resume after a crash (tiny random model)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from airlock.config import get_settings
from airlock.finetune.files import file_path
from airlock.finetune.jobs import KIND, FineTuneHandler
from airlock.jobs import service
from airlock.jobs.models import Job
from airlock.jobs.runner import JobRunner
from tests.finetune.waits import wait_for_recorded_checkpoint, wait_for_status, wait_on_progress

EXAMPLES = [
    {"messages": [{"role": "user", "content": f"What is the code {i}?"}, {"role": "assistant", "content": "ZEBRA"}]}
    for i in range(8)
]


@pytest.fixture
def training_file(airlock_env: Path) -> str:
    file_id = "file-test0001"
    path = file_path(get_settings().home_dir, file_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(e) for e in EXAMPLES) + "\n")
    return file_id


def enqueue(db: Any, training_file: str, **hyper: Any) -> str:
    params = {
        "base_model": "tiny-random",
        "training_file": training_file,
        "hyperparameters": {"n_epochs": 3, "batch_size": 2, **hyper},
        "seed": 1,
        "checkpoint_every": 2,
    }
    with db.session() as session:
        job = service.enqueue(session, KIND, evaluator_id=None, grant_id=None, params=params, id_prefix="ftjob")
        return job.id


def wait_for(db: Any, job_id: str, statuses: set[str]) -> Job:
    return wait_for_status(db, job_id, statuses)


def test_job_trains_and_reports_metrics(db: Any, training_file: str) -> None:
    handler = FineTuneHandler(get_settings().home_dir)
    runner = JobRunner(db, {KIND: handler})
    job_id = enqueue(db, training_file)
    runner.start()
    try:
        job = wait_for(db, job_id, {"succeeded", "failed"})
    finally:
        runner.stop()
    assert job.status == "succeeded", job.error
    assert job.result["steps"] == 12 and (handler.output_dir(job_id) / "adapter").is_dir()
    with db.session() as session:
        events, _ = service.list_events(session, job_id, limit=100)
    losses = [e.data["train_loss"] for e in events if e.type == "metrics"]
    assert len(losses) == 12 and job.checkpoint and job.checkpoint["step"] == 10


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_job_resumes_from_its_checkpoint_after_a_crash(db: Any, training_file: str) -> None:
    handler = FineTuneHandler(get_settings().home_dir)
    reference_id = enqueue(db, training_file)
    runner = JobRunner(db, {KIND: handler})
    runner.start()
    try:
        reference = wait_for(db, reference_id, {"succeeded", "failed"})
    finally:
        runner.stop()
    assert reference.status == "succeeded"

    # A second job is interrupted after its first checkpoint, as if the process had died.
    job_id = enqueue(db, training_file)
    runner = JobRunner(db, {KIND: handler})
    runner.start()
    recorded = wait_for_recorded_checkpoint(db, job_id).checkpoint
    runner.stop()  # shutdown re-queues the resumable job
    with db.session() as session:
        job = service.get_job(session, job_id)
        assert job.status in ("queued", "succeeded")
        assert recorded and job.checkpoint and job.checkpoint["step"] >= recorded["step"]
        step = job.checkpoint["step"]
        # make it look like a crash: still "running", with a stale heartbeat
        session.execute(update(Job).where(Job.id == job_id).values(status="running", heartbeat_at=None))
    runner = JobRunner(db, {KIND: handler})
    runner.start()
    try:
        job = wait_for(db, job_id, {"succeeded", "failed"})
    finally:
        runner.stop()
    assert job.status == "succeeded", job.error
    assert job.result["adapter_sha256"] == reference.result["adapter_sha256"]  # same adapter as uninterrupted
    with db.session() as session:
        events, _ = service.list_events(session, job_id, limit=500)
    messages = [e.message or "" for e in events]
    # The runner's restart event and the handler's resume name the same recorded step.
    assert any(m.endswith(f"re-queued to resume from step-{step}") for m in messages), messages
    assert f"resuming from step-{step}" in messages, messages


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_cancel_stops_training_quickly(db: Any, training_file: str) -> None:
    handler = FineTuneHandler(get_settings().home_dir)
    job_id = enqueue(db, training_file, n_epochs=50, batch_size=1)
    runner = JobRunner(db, {KIND: handler})
    runner.start()
    try:
        wait_for(db, job_id, {"running"})
        wait_on_progress(db, job_id, lambda job: job.progress > 0)
        with db.session() as session:
            service.request_cancel(session, job_id)
        job = wait_for(db, job_id, {"cancelled", "failed", "succeeded"})
        # 50 epochs would take far longer than any cancel: stopping part-way shows the request took effect.
        assert job.status == "cancelled" and job.progress < 1.0, (job.status, job.progress)
    finally:
        runner.stop()
