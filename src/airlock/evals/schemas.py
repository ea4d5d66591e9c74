"""Wire schemas for signing keys and attested results."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from airlock.evals.models import EvalResult, SigningKey


class SigningKeyCreate(BaseModel):
    """Register an Ed25519 public key for the caller's evaluator organisation."""

    model_config = ConfigDict(extra="forbid")
    public_key: str = Field(min_length=40, max_length=64, description="Base64 raw 32-byte Ed25519 public key.")


class SigningKeyPublic(BaseModel):
    """A registered signing key."""

    id: str
    evaluator_id: str
    public_key: str
    fingerprint: str
    created_at: datetime
    revoked_at: datetime | None

    @classmethod
    def of(cls, row: SigningKey) -> SigningKeyPublic:
        """Build from a row."""
        return cls.model_validate(row, from_attributes=True)


class MetricCI(BaseModel):
    """A metric with its 95 % confidence interval."""

    value: float
    ci95: list[float] = Field(min_length=2, max_length=2)
    method: str
    n: int = Field(ge=0)


class Attestation(BaseModel):
    """The signed statement about one eval run (extra fields are allowed and kept)."""

    model_config = ConfigDict(extra="allow")
    schema_: str = Field(alias="schema")
    evaluator: str
    grant_id: str
    model: str
    model_id: str
    version: str
    version_hash: str = Field(pattern=r"^[0-9a-f]{64}$")
    variant: str
    mitigations: list[dict[str, Any]] = Field(default_factory=list)
    suite: str | None = None
    suite_version: str | None = None
    task: str = Field(min_length=1)
    dataset_hash: str = Field(pattern=r"^[0-9a-f]{64}$")
    samples: int = Field(ge=1)
    metrics: dict[str, MetricCI] = Field(min_length=1)
    elicitation: dict[str, Any]
    log_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    created_at: datetime


class ResultEnvelope(BaseModel):
    """``POST /v1/airlock/results`` body: an attestation, its signature and the signing key."""

    model_config = ConfigDict(extra="forbid")
    attestation: dict[str, Any]
    signature: str = Field(min_length=10, max_length=200)
    public_key: str = Field(min_length=40, max_length=64)


class EvalResultPublic(BaseModel):
    """A stored, verified result."""

    id: str
    evaluator_id: str
    grant_id: str
    model_id: str
    version_id: str
    variant: str
    suite: str | None
    task: str
    dataset_hash: str
    samples: int
    metrics: dict[str, Any]
    elicitation: dict[str, Any]
    fine_tuned: bool
    log_sha256: str
    key_fingerprint: str
    created_at: datetime

    @classmethod
    def of(cls, row: EvalResult) -> EvalResultPublic:
        """Build from a row."""
        return cls.model_validate(row, from_attributes=True)


class ElicitationFlag(BaseModel):
    """One comparison of two results: which check, the difference, its interval, and whether it flags."""

    check: str = Field(description="`weaker_elicitation_wins`, `noise_raises_score` or `few_shot_unlocks`.")
    task: str
    base: str = Field(description="The result compared against (the weaker level, un-noised or zero-shot run).")
    other: str = Field(description="The result compared (the stronger level, noised or few-shot run).")
    difference: float = Field(description="Score of `other` minus score of `base`.")
    ci: list[float] = Field(description="The difference's Bonferroni-adjusted Newcombe interval.")
    margin: float = Field(description="What the difference must clear in the suspicious direction.")
    flagged: bool
    reason: str | None = None


class ElicitationReport(BaseModel):
    """Results of one task on one model version by elicitation level, and the sandbagging checks."""

    model: str
    version: str
    version_hash: str
    task: str
    metric: str
    alpha: float = Field(description="Chance that an honest model's report flags anything (family-wise).")
    family_size: int = Field(description="Number of comparisons the intervals are adjusted for.")
    interval_level: float
    interval_method: str
    few_shot_min_gain: float
    levels: dict[str, list[dict[str, Any]]] = Field(
        description="`production`, `helpful-only`, `fine-tuned`, `noise-injected`: each result with its score."
    )
    strongest_level: str | None
    comparisons: list[ElicitationFlag]
    flags: list[ElicitationFlag]
    flagged: bool
    ignored_results: list[dict[str, str]]
