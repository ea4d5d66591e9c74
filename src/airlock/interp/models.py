"""Tables of the interp package: one row per interp job, beside its generic ``jobs`` row."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Float, ForeignKey, Index, String, Text, false, text
from sqlalchemy.orm import Mapped, mapped_column

from airlock.db import Base, utcnow

REVIEW_STATES = ("none", "pending", "approved", "denied")


class InterpJob(Base):
    """What an interp job ran, what it used and produced, and the lab's review of its result.

    The code itself is stored under the data dir (``interp/<job id>/code.py``); its SHA-256 is
    here, with the arguments, the target, the resources used and the size of the result.
    """

    __tablename__ = "interp_jobs"
    __table_args__ = (
        Index("ix_interp_jobs_grant_created", "grant_id", "created_at"),
        Index("ix_interp_jobs_review_state", "review_state", "created_at"),
    )

    id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    evaluator_id: Mapped[str] = mapped_column(String(40))
    grant_id: Mapped[str] = mapped_column(String(40))
    model: Mapped[str] = mapped_column(String(255))
    """``{model}/{variant}`` as submitted."""
    version_id: Mapped[str] = mapped_column(String(40))
    variant_id: Mapped[str] = mapped_column(String(40))
    content_hash: Mapped[str] = mapped_column(String(64), default="")
    """Hash of the model version's weights."""
    filename: Mapped[str] = mapped_column(String(255))
    entry_point: Mapped[str] = mapped_column(String(128))
    code_sha256: Mapped[str] = mapped_column(String(64))
    code_bytes: Mapped[int] = mapped_column(BigInteger)
    args: Mapped[dict[str, Any]] = mapped_column(default=dict)
    limits: Mapped[dict[str, Any]] = mapped_column(default=dict)
    usage: Mapped[dict[str, Any]] = mapped_column(default=dict)
    """Sandbox CPU/wall/RSS, RPC calls and bytes, host model seconds."""
    cpu_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    """Charged against the grant's interp CPU quota: sandbox CPU plus host model time."""
    served_bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    """Activations, logits and texts the host served into the sandbox (every attempt), for the grant's budget."""
    logs: Mapped[str] = mapped_column(Text, default="")
    logs_withheld: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    """The job ran past its grant's serving review threshold: its logs and error details are the lab's only."""
    result_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    result_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    result_arrays: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    review_state: Mapped[str] = mapped_column(String(16), default="none")
    review_reasons: Mapped[list[str]] = mapped_column(default=list)
    reviewer: Mapped[str | None] = mapped_column(String(255), nullable=True)
    review_note: Mapped[str | None] = mapped_column(Text, nullable=True)
    reviewed_at: Mapped[datetime | None] = mapped_column(nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
