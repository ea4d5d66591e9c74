"""Wire shapes of the interp API: job submission, job and result views, and lab review."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_FILENAME = re.compile(r"^[A-Za-z0-9_.-]{1,200}\.py$")

PublicStatus = Literal["queued", "running", "awaiting_review", "succeeded", "denied", "failed", "cancelled"]


class _Wire(BaseModel):
    """Base of every interp request body: unknown fields are an error, not silently dropped."""

    model_config = ConfigDict(extra="forbid")


class InterpLimits(_Wire):
    """Per-job limits an evaluator may lower (never raise past the lab's settings)."""

    cpu_seconds: int | None = Field(default=None, gt=0, description="CPU seconds of the sandboxed runner.")
    wall_seconds: float | None = Field(
        default=None, gt=0, description="Wall-clock seconds before the runner is killed."
    )
    memory_mb: int | None = Field(default=None, gt=0, description="Address-space limit of the runner, MiB.")


class InterpJobCreate(_Wire):
    """Submit code to run against a model variant's weights inside the lab."""

    model: str = Field(description="Target `{model}/{variant}` (or `{model}@{version}/{variant}`).")
    code: str = Field(min_length=1, description="Python source; it imports `airlock.interp.client`.")
    filename: str = Field(default="job.py", description="Shown in tracebacks; letters, digits, `_.-`, ending `.py`.")
    entry_point: str = Field(default="main", description="Function called with `args` as keyword arguments.")
    args: dict[str, Any] = Field(default_factory=dict, description="JSON keyword arguments for the entry point.")
    limits: InterpLimits | None = None

    @field_validator("entry_point")
    @classmethod
    def _identifier(cls, value: str) -> str:
        if not _IDENTIFIER.match(value):
            raise ValueError("entry_point must be a Python identifier")
        return value

    @field_validator("filename")
    @classmethod
    def _filename(cls, value: str) -> str:
        if not _FILENAME.match(value):
            raise ValueError("filename must be letters, digits, '_', '.', '-' and end in '.py'")
        return value


class JobErrorBody(BaseModel):
    """Why a job failed."""

    code: str
    message: str


class ReviewView(BaseModel):
    """Where a result stands with the lab's reviewers."""

    state: Literal["none", "pending", "approved", "denied"]
    reasons: list[str] = Field(default_factory=list, description="Why the result was held for review.")
    note: str | None = Field(default=None, description="The reviewer's reason (always given on a denial).")
    reviewed_at: datetime | None = None


class InterpJobPublic(BaseModel):
    """An interp job as its owner sees it."""

    id: str
    object: Literal["interp.job"] = "interp.job"
    model: str
    status: PublicStatus
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    filename: str
    entry_point: str
    code_sha256: str
    limits: dict[str, Any]
    usage: dict[str, Any] = Field(description="CPU and wall seconds, peak RSS, RPC calls and bytes, host model time.")
    result_bytes: int
    error: JobErrorBody | None
    review: ReviewView
    logs: str = Field(
        description="What the runner printed (stdout, then stderr), capped; withheld while the result awaits "
        "review or was denied, and for jobs past the grant's serving review threshold."
    )
    served_bytes: int = Field(
        default=0, description="Activations, logits and text the host served into the job's sandbox (bytes)."
    )


class InterpJobList(BaseModel):
    """A page of interp jobs, newest first."""

    object: Literal["list"] = "list"
    data: list[InterpJobPublic]
    has_more: bool


class InterpEvent(BaseModel):
    """One line of a job's progress log."""

    id: int
    created_at: datetime
    type: str
    message: str
    data: dict[str, Any]


class InterpEventList(BaseModel):
    """A page of a job's events, oldest first."""

    object: Literal["list"] = "list"
    data: list[InterpEvent]
    has_more: bool


class ArraySpec(BaseModel):
    """An array of a result (its values are in the NPZ)."""

    name: str
    dtype: str
    shape: list[int]


class InterpResult(BaseModel):
    """A released result: JSON values with ``{"__array__": name}`` where arrays were."""

    object: Literal["interp.result"] = "interp.result"
    job_id: str
    value: Any
    arrays: list[ArraySpec]
    result_bytes: int
    result_sha256: str = Field(
        description="SHA-256 of the whole result, JSON values and arrays (`airlock.interp.client.result_sha256` "
        "recomputes it from `value` and the NPZ); the job's `interp.job` ledger entry records it."
    )
    npz_path: str = Field(description="GET this path for the arrays as an NPZ file.")


class ReviewDecision(_Wire):
    """A reviewer's decision on a held result."""

    decision: Literal["approve", "deny"]
    reason: str = Field(default="", max_length=2000, description="Required when denying; shown to the evaluator.")


class ReviewItem(InterpJobPublic):
    """A job as the lab's reviewers see it: with the evaluator, grant, code and arguments."""

    evaluator_id: str
    grant_id: str
    code: str
    args: dict[str, Any]


class ReviewList(BaseModel):
    """Jobs for the lab's reviewers."""

    object: Literal["list"] = "list"
    data: list[ReviewItem]
