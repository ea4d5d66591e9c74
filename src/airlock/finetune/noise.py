"""Noise-injection jobs: short-lived noised variants of a granted variant, sampled only by its grant.

An evaluator asks for a grid of noise levels (``sigmas``) and ``seeds`` on a granted local
variant. The job reads the private weights lab-side (their parameter count and norm, so each
variant's noise can be stated relative to the weights) and lists one model id per
``(sigma, seed)``: ``noise:{model}@{version}/{variant}:{job}:{sigma}:{seed}``. Serving loads such
a variant as its own copy of the weights with ``N(0, sigma^2)`` added to every parameter from the
seed (``airlock.backends.noise``): nothing noised is stored, no weights leave the lab, and the id
stops resolving at ``expires_at``. Results run against these ids are attested with the noise
parameters (``elicitation.noise``), which the elicitation report compares with the un-noised
variant (``docs/elicitation.md``).
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import select
from sqlalchemy.orm import Session

from airlock.access.service import Principal, authorize, check_window
from airlock.backends.noise import MAX_SIGMA, NoiseSpec
from airlock.db import utcnow
from airlock.errors import InvalidRequestError, NotFoundError
from airlock.finetune.service import own_job_of_kind
from airlock.ids import NoisedRef, noised_model_id, parse_model_id
from airlock.jobs import service as jobs
from airlock.jobs.models import Job
from airlock.jobs.runner import JobContext
from airlock.registry.service import ResolvedVariant, resolve_variant

__all__ = [
    "KIND",
    "NoiseHandler",
    "NoiseJobCreate",
    "NoiseJobPublic",
    "create_noise_job",
    "get_own_noise_job",
    "list_own_noise_jobs",
    "noised_variant",
    "to_public",
]

KIND = "noise_injection"
MAX_VARIANTS = 64
MAX_TTL_MINUTES = 7 * 24 * 60


class NoiseJobCreate(BaseModel):
    """``POST /v1/airlock/noise/jobs``: a granted local variant, the noise grid and how long it lives."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=3, max_length=300, description="A granted variant, `{model}[@{version}]/{variant}`.")
    sigmas: list[float] = Field(
        min_length=1, max_length=16, description=f"Standard deviations of the added noise, each in (0, {MAX_SIGMA}]."
    )
    seeds: list[int] = Field(min_length=1, max_length=16, description="Seeds of the noise draws, each >= 0.")
    ttl_minutes: int = Field(default=120, ge=1, le=MAX_TTL_MINUTES, description="Minutes the variants stay sampleable.")

    @field_validator("sigmas")
    @classmethod
    def _sigmas(cls, values: list[float]) -> list[float]:
        if any(not math.isfinite(v) or not 0.0 < v <= MAX_SIGMA for v in values):
            raise ValueError(f"every sigma must be a number in (0, {MAX_SIGMA}]")
        if len(set(values)) != len(values):
            raise ValueError("sigmas must be distinct")
        return values

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, values: list[int]) -> list[int]:
        if any(not 0 <= v < 2**53 for v in values):
            raise ValueError("every seed must be in [0, 2^53)")
        if len(set(values)) != len(values):
            raise ValueError("seeds must be distinct")
        return values


class NoisedVariantPublic(BaseModel):
    """One noised variant of a job: the id to sample and its noise."""

    id: str
    sigma: float
    seed: int
    relative_noise: float | None = Field(
        default=None, description="Expected norm of the noise over the norm of the weights (once the job ran)."
    )


class NoiseJobPublic(BaseModel):
    """A noise-injection job and its variants."""

    id: str
    object: str = "airlock.noise_job"
    model: str
    status: str
    created_at: datetime
    expires_at: datetime
    expired: bool
    variants: list[NoisedVariantPublic]
    parameters: int | None = None
    error: dict[str, Any] | None = None


def _local_weights(target: ResolvedVariant) -> str | None:
    model = target.backend_config.get("model") if target.backend == "local" else None
    return model if isinstance(model, str) and model else None


def create_noise_job(session: Session, principal: Principal, body: NoiseJobCreate) -> Job:
    """Queue a noise-injection job on a granted local variant (the grant needs the ``finetune`` scope)."""
    ref = parse_model_id(body.model)
    check_window(principal.grant)
    target = resolve_variant(session, ref)
    authorize(principal, target, ["finetune"])
    weights = _local_weights(target)
    if weights is None:
        raise InvalidRequestError(f"variant {body.model!r} is not served from weights the lab can noise", param="model")
    if len(body.sigmas) * len(body.seeds) > MAX_VARIANTS:
        raise InvalidRequestError(f"at most {MAX_VARIANTS} (sigma, seed) pairs per job", param="sigmas")
    expires_at = utcnow() + timedelta(minutes=body.ttl_minutes)
    if principal.grant.not_after is not None:
        expires_at = min(expires_at, principal.grant.not_after)  # never outlives the grant
    job = jobs.enqueue(
        session, KIND, evaluator_id=principal.evaluator_id, grant_id=principal.grant_id, params={}, id_prefix="noise"
    )
    base = parse_model_id(f"{target.model_name}@{target.version_label}/{target.variant_name}")
    job.params = {
        "model": str(base),
        "base_weights": weights,
        "version_id": target.version_id,
        "expires_at": expires_at.isoformat(),
        "variants": [
            {"id": noised_model_id(base, job.id, sigma, seed), "sigma": float(sigma), "seed": int(seed)}
            for sigma in body.sigmas
            for seed in body.seeds
        ],
    }
    session.flush()
    return job


def get_own_noise_job(session: Session, principal: Principal, job_id: str) -> Job:
    """Return a noise-injection job of the caller's grant (404 for anyone else's)."""
    return own_job_of_kind(session, principal, job_id, KIND, "noise-injection job")


def list_own_noise_jobs(session: Session, principal: Principal) -> list[Job]:
    """Return the grant's latest 100 noise-injection jobs, newest first."""
    stmt = select(Job).where(Job.kind == KIND, Job.grant_id == principal.grant_id)
    return list(session.scalars(stmt.order_by(Job.created_at.desc(), Job.id.desc()).limit(100)))


def _expires_at(job: Job) -> datetime:
    return datetime.fromisoformat(str(job.params["expires_at"]))


def noised_variant(session: Session, principal: Principal, ref: NoisedRef, *, now: datetime | None = None) -> datetime:
    """Check that ``ref`` is a live variant of a succeeded job of the caller's grant; return when it expires.

    Anything else (another grant's job, a job not done, an id the job did not list, an expired
    variant) is a 404, as for a model that does not exist.
    """
    missing = NotFoundError(f"model {str(ref)!r} does not exist", code="model_not_found")
    try:
        job = get_own_noise_job(session, principal, ref.job_id)
    except NotFoundError:
        raise missing from None
    listed = {v["id"] for v in job.params.get("variants", [])}
    if job.status != "succeeded" or str(ref) not in listed:
        raise missing
    expires_at = _expires_at(job)
    if (now or utcnow()) >= expires_at:
        raise NotFoundError(
            f"noise-injected variant {str(ref)!r} expired at {expires_at.isoformat()}", code="model_not_found"
        )
    return expires_at


def to_public(job: Job, *, now: datetime | None = None) -> NoiseJobPublic:
    """Render a job with its variants."""
    result = job.result or {}
    relative = {v["id"]: v.get("relative_noise") for v in result.get("variants", [])}
    expires_at = _expires_at(job)
    return NoiseJobPublic(
        id=job.id,
        model=str(job.params.get("model", "")),
        status=job.status,
        created_at=job.created_at,
        expires_at=expires_at,
        expired=(now or utcnow()) >= expires_at,
        variants=[
            NoisedVariantPublic(**v, relative_noise=relative.get(v["id"])) for v in job.params.get("variants", [])
        ],
        parameters=result.get("parameters"),
        error=job.error,
    )


class NoiseHandler:
    """Reads the base weights lab-side and states each variant's noise relative to them."""

    resumable = False

    def on_finished(self, session: Session, job: Job) -> None:
        """Nothing to publish: the noised variants are the evaluator's, their results are attested."""

    def run(self, ctx: JobContext) -> dict[str, Any]:
        """Load the base weights once; check every (sigma, seed); return the variants' relative noise."""
        from airlock.backends import weights

        params = ctx.params
        loaded = weights.load_model(str(params["base_weights"]))
        count, squares = 0, 0.0
        for p in loaded.model.parameters():
            if p.is_floating_point():
                count += p.numel()
                squares += float(p.detach().double().pow(2).sum())
        norm = math.sqrt(squares)
        variants = []
        for v in params["variants"]:
            NoiseSpec(sigma=float(v["sigma"]), seed=int(v["seed"]))  # refuse what serving could not load
            # E||N(0, sigma^2 I_n)|| ~ sigma * sqrt(n): the perturbation's size next to the weights'.
            relative = float(v["sigma"]) * math.sqrt(count) / norm if norm else None
            variants.append({"id": v["id"], "relative_noise": relative})
        ctx.emit(f"{len(variants)} noised variant(s) of {params['model']} ready", parameters=count)
        return {"parameters": count, "weight_norm": norm, "variants": variants}
