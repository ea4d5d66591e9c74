"""Fine-tuning's ledger events: what the public record says about a fine-tuning job."""

from __future__ import annotations

from sqlalchemy.orm import Session

from airlock.jobs.models import Job
from airlock.ledger import service as ledger
from airlock.registry.events import version_ref
from airlock.registry.models import ModelVersion


def job_finished(session: Session, job: Job) -> None:
    """Log ``finetune.job`` when a fine-tuning job reaches a terminal state (in that transition's transaction)."""
    params, result = job.params or {}, job.result or {}
    version = session.get(ModelVersion, params["version_id"]) if params.get("version_id") else None
    body = {
        "job": job.id,
        "grant": job.grant_id,
        "model": params.get("model"),
        "version": version_ref(version) if version else None,
        "status": job.status,
        "fine_tuned_model": params.get("fine_tuned_model"),
        "trained_tokens": result.get("trained_tokens"),
        "steps": result.get("steps"),
        "finished_at": job.finished_at,
    }
    ledger.record_event(session, "finetune.job", body, confidential={"hyperparameters": params.get("hyperparameters")})
