"""Fine-tuning jobs: create (checked against the grant), describe, list, cancel; fine-tuned model ids."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from airlock.access.acceptance import require_acceptance
from airlock.access.service import Principal, authorize, check_window
from airlock.access.terms import terms_of
from airlock.errors import InvalidRequestError, NotFoundError, RateLimitError
from airlock.finetune.files import get_file
from airlock.finetune.jobs import KIND
from airlock.finetune.schemas import FineTuningJob, FineTuningJobCreate, JobError
from airlock.finetune.terms import FinetuneTerms
from airlock.finetune.trainer import resolve_hyperparameters
from airlock.ids import fine_tuned_model_id, parse_model_id
from airlock.jobs import service as jobs
from airlock.jobs.models import Job
from airlock.registry.service import RegistryCache, ResolvedVariant, resolve_variant


def create_job(session: Session, registry: RegistryCache, principal: Principal, body: FineTuningJobCreate) -> Job:
    """Queue a fine-tuning job on a granted local variant, from the organisation's own files."""
    if body.method is not None and body.method.type != "supervised":
        raise InvalidRequestError("only method.type=supervised is supported", param="method")
    ref = parse_model_id(body.model)
    check_window(principal.grant)
    target = resolve_variant(session, ref)
    authorize(principal, target, ["finetune"])
    require_acceptance(session, principal.grant, "retention_finetune")
    weights = trainable_weights(target)
    if weights is None:
        raise InvalidRequestError(f"variant {body.model!r} is not served from weights the lab trains on")
    for param, file_id in (("training_file", body.training_file), ("validation_file", body.validation_file)):
        if file_id is not None:
            try:
                get_file(session, file_id, principal.evaluator_id)
            except NotFoundError:
                raise InvalidRequestError(f"file {file_id!r} does not exist", param=param) from None
    hyper = (body.hyperparameters.model_dump() if body.hyperparameters else {}) | {}
    try:  # reject impossible values now, not after the job has queued
        resolve_hyperparameters(
            10,
            hyper.get("n_epochs", "auto"),
            hyper.get("batch_size", "auto"),
            hyper.get("learning_rate_multiplier", "auto"),
        )
    except ValueError as exc:
        raise InvalidRequestError(str(exc), param="hyperparameters") from None
    enforce_job_quotas(session, principal)
    job = jobs.enqueue(
        session,
        KIND,
        evaluator_id=principal.evaluator_id,
        grant_id=principal.grant_id,
        params={},
        id_prefix="ftjob",
    )
    base = f"{target.model_name}/{target.variant_name}"
    job.params = {
        "model": base,
        "version_id": target.version_id,
        "base_model": weights,
        "device": training_device(target),
        "training_file": body.training_file,
        "validation_file": body.validation_file,
        "hyperparameters": hyper,
        "seed": body.seed if body.seed is not None else 0,
        "suffix": body.suffix,
        "fine_tuned_model": fine_tuned_model_id(base, principal.evaluator_name, body.suffix, job.id),
    }
    session.flush()
    return job


def trainable_weights(target: ResolvedVariant) -> str | None:
    """Return the weights spec adapters of ``target`` are trained on, or None when the lab holds none.

    A local variant trains on the weights it serves; a vLLM-served variant on the ``weights`` it
    declares (the checkpoint its server loads), and its adapter is then loaded into that server.
    """
    config = target.backend_config
    if target.backend == "local":
        model = config.get("model")
    elif target.backend == "openai_upstream" and config.get("engine") == "vllm":
        model = config.get("weights")
    else:
        model = None
    return model if isinstance(model, str) and model else None


def training_device(target: ResolvedVariant) -> str:
    """Return the device adapters of ``target`` train on: the one its weights are served on by the lab's workers."""
    config = target.backend_config
    device = config.get("device") if target.backend == "local" else config.get("worker_device")
    return device if isinstance(device, str) and device else "cpu"


def enforce_job_quotas(session: Session, principal: Principal) -> None:
    """Refuse a new job (429) when the grant has used its fine-tuning job or trained-token quota."""
    terms = terms_of(principal.grant, FinetuneTerms)
    if terms.quota_finetune_jobs is None and terms.quota_trained_tokens is None:
        return
    rows = list(session.scalars(select(Job).where(Job.kind == KIND, Job.grant_id == principal.grant_id)))
    if terms.quota_finetune_jobs is not None and len(rows) >= terms.quota_finetune_jobs:
        raise RateLimitError(
            f"your grant's quota of {terms.quota_finetune_jobs} fine-tuning jobs is used up", code="insufficient_quota"
        )
    trained = sum(int((r.result or {}).get("trained_tokens") or 0) for r in rows)
    if terms.quota_trained_tokens is not None and trained >= terms.quota_trained_tokens:
        raise RateLimitError(
            f"your grant's quota of {terms.quota_trained_tokens} trained tokens is used up ({trained} used)",
            code="insufficient_quota",
        )


def get_own_job(session: Session, principal: Principal, job_id: str) -> Job:
    """Return a fine-tuning job of the caller's grant (404 for anyone else's: existence is not revealed)."""
    return own_job_of_kind(session, principal, job_id, KIND, "fine-tuning job")


def own_job_of_kind(session: Session, principal: Principal, job_id: str, kind: str, noun: str) -> Job:
    """Return the job ``job_id`` of ``kind`` if the caller's grant made it; 404 naming the ``noun`` otherwise."""
    job = session.get(Job, job_id)
    if job is None or job.kind != kind or job.grant_id != principal.grant_id:
        raise NotFoundError(f"{noun} {job_id!r} does not exist", code="job_not_found")
    return job


def succeeded_jobs(session: Session, grant_id: str) -> list[Job]:
    """Return the grant's succeeded fine-tuning jobs (their models can be sampled)."""
    stmt = select(Job).where(Job.kind == KIND, Job.grant_id == grant_id, Job.status == "succeeded")
    return list(session.scalars(stmt.order_by(Job.created_at)))


def to_public(job: Job) -> FineTuningJob:
    """Render a job in OpenAI's shape."""
    params: dict[str, Any] = job.params
    result: dict[str, Any] = job.result or {}
    error = JobError(code=job.error.get("code", "error"), message=job.error.get("message", "")) if job.error else None
    hyper = result.get("hyperparameters") or params.get("hyperparameters") or {}
    return FineTuningJob(
        id=job.id,
        created_at=int(job.created_at.timestamp()),
        finished_at=int(job.finished_at.timestamp()) if job.finished_at else None,
        model=params.get("model", ""),
        fine_tuned_model=params.get("fine_tuned_model") if job.status == "succeeded" else None,
        organization_id=job.evaluator_id or "",
        status=job.status,
        hyperparameters={k: hyper.get(k, "auto") for k in ("n_epochs", "batch_size", "learning_rate_multiplier")},
        training_file=params.get("training_file", ""),
        validation_file=params.get("validation_file"),
        trained_tokens=result.get("trained_tokens"),
        error=error,
        seed=int(params.get("seed") or 0),
        suffix=params.get("suffix"),
        user_provided_suffix=params.get("suffix"),
    )
