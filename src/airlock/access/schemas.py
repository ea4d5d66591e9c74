"""Wire schemas of the admin access API: ``XCreate`` in, ``XPublic`` out."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from airlock.access.models import ApiKey, AuditEvent, Evaluator, Grant
from airlock.access.service import grant_status


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EvaluatorCreate(_In):
    """Register an evaluator organisation."""

    name: str = Field(min_length=1, max_length=100, description="Unique organisation name.")
    contact: str = Field(default="", max_length=200, description="Contact address.")


class EvaluatorPublic(BaseModel):
    """An evaluator organisation."""

    id: str
    name: str
    contact: str
    created_at: datetime

    @classmethod
    def of(cls, row: Evaluator) -> EvaluatorPublic:
        """Build from a row."""
        return cls(id=row.id, name=row.name, contact=row.contact, created_at=row.created_at)


class GrantCreate(_In):
    """Issue a grant."""

    evaluator: str = Field(description="Evaluator name or id.")
    model: str = Field(description="Model name, optionally `name@version`.")
    versions: list[str] | None = Field(default=None, description="Version labels; default the latest.")
    variants: list[str] = Field(min_length=1, description="Variant names the grant covers.")
    scopes: list[str] = Field(min_length=1, description="`sample`, `logprobs`, `finetune`, `interp`, `redteam`.")
    not_before: datetime | None = Field(default=None, description="Start of validity (UTC); default now.")
    not_after: datetime | None = Field(default=None, description="End of validity (UTC).")
    expires_in: str | None = Field(default=None, description="Alternative to not_after, e.g. `30d`.")
    quota_requests_per_minute: int | None = Field(default=None, gt=0)
    quota_total_tokens: int | None = Field(default=None, gt=0)
    quota_finetune_jobs: int | None = Field(default=None, gt=0, description="Fine-tuning jobs the grant may start.")
    quota_trained_tokens: int | None = Field(default=None, gt=0, description="Tokens all its jobs may train on.")
    quota_file_bytes: int | None = Field(default=None, gt=0, description="Bytes of training files it may hold.")
    quota_interp_cpu_seconds: float | None = Field(
        default=None, gt=0, description="Sandbox CPU-seconds for remote interpretability jobs."
    )
    quota_result_bytes: int | None = Field(default=None, gt=0, description="Bytes of interpretability results.")
    interp_full_logits: bool = Field(
        default=False,
        description="Interp may return full-vocabulary logits (otherwise top-k plus requested token ids only).",
    )
    quota_interp_served_bytes: int | None = Field(
        default=None,
        gt=0,
        description="Activation, logit and text bytes all interp jobs may be served; default relative to the model.",
    )
    interp_review_served_bytes: int | None = Field(
        default=None,
        gt=0,
        description="Served bytes past which interp results wait for review; default relative to the model.",
    )
    embargo_days: int | None = Field(default=None, ge=0, description="Publication embargo after deployment.")
    notes: str = ""


class GrantRevoke(_In):
    """Revoke a grant."""

    reason: str = Field(default="", max_length=2000)


class GrantPublic(BaseModel):
    """A grant as the lab sees it."""

    id: str
    evaluator: str
    model_id: str
    version_ids: list[str]
    variants: list[str]
    scopes: list[str]
    not_before: datetime
    not_after: datetime | None
    status: str
    quota_requests_per_minute: int | None
    quota_total_tokens: int | None
    quota_finetune_jobs: int | None = None
    quota_trained_tokens: int | None = None
    quota_file_bytes: int | None = None
    quota_interp_cpu_seconds: float | None = None
    quota_result_bytes: int | None = None
    interp_full_logits: bool = False
    quota_interp_served_bytes: int | None = None
    interp_review_served_bytes: int | None = None
    tokens_used: int
    created_at: datetime
    revoked_at: datetime | None
    revoked_reason: str | None

    @classmethod
    def of(cls, row: Grant) -> GrantPublic:
        """Build from a row (evaluator loaded)."""
        return cls(
            id=row.id,
            evaluator=row.evaluator.name,
            model_id=row.model_id,
            version_ids=list(row.version_ids),
            variants=list(row.variants),
            scopes=list(row.scopes),
            not_before=row.not_before,
            not_after=row.not_after,
            status=grant_status(row),
            quota_requests_per_minute=row.quota_requests_per_minute,
            quota_total_tokens=row.quota_total_tokens,
            quota_finetune_jobs=row.quota_finetune_jobs,
            quota_trained_tokens=row.quota_trained_tokens,
            quota_file_bytes=row.quota_file_bytes,
            quota_interp_cpu_seconds=row.quota_interp_cpu_seconds,
            quota_result_bytes=row.quota_result_bytes,
            interp_full_logits=bool(row.interp_full_logits),
            quota_interp_served_bytes=row.quota_interp_served_bytes,
            interp_review_served_bytes=row.interp_review_served_bytes,
            tokens_used=row.tokens_used,
            created_at=row.created_at,
            revoked_at=row.revoked_at,
            revoked_reason=row.revoked_reason,
        )


class KeyCreate(_In):
    """Create an API key for a grant."""

    name: str = Field(default="", max_length=100)


class KeyCreated(BaseModel):
    """A new API key; ``key`` is shown only in this response."""

    id: str
    grant_id: str
    key: str
    display_prefix: str


class KeyPublic(BaseModel):
    """An API key without its secret."""

    id: str
    grant_id: str
    name: str
    display_prefix: str
    created_at: datetime
    revoked_at: datetime | None

    @classmethod
    def of(cls, row: ApiKey) -> KeyPublic:
        """Build from a row."""
        return cls(
            id=row.id,
            grant_id=row.grant_id,
            name=row.name,
            display_prefix=row.display_prefix,
            created_at=row.created_at,
            revoked_at=row.revoked_at,
        )


class AuditEventPublic(BaseModel):
    """An audit event."""

    id: int
    ts: datetime
    request_id: str
    actor_type: str
    actor: str | None
    grant_id: str | None
    method: str
    path: str
    model: str | None
    variant: str | None
    scope: str | None
    status_code: int
    outcome: str
    error_code: str | None
    tokens_in: int
    tokens_out: int
    latency_ms: float
    detail: dict[str, Any]

    @classmethod
    def of(cls, row: AuditEvent) -> AuditEventPublic:
        """Build from a row."""
        return cls.model_validate(row, from_attributes=True)
