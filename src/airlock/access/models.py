"""Access tables: evaluator organisations, grants, API keys, admin tokens and the audit trail."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column, relationship

from airlock.db import Base, new_id, utcnow

SCOPES = ("sample", "logprobs", "finetune", "interp", "redteam")


class Evaluator(Base):
    """An external evaluator organisation."""

    __tablename__ = "evaluators"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("evalr"))
    name: Mapped[str] = mapped_column(String(100), unique=True)
    contact: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    grants: Mapped[list[Grant]] = relationship(back_populates="evaluator")


class Grant(Base):
    """What one evaluator may do: variants × model versions × scopes, in a window, on each capability's terms."""

    __tablename__ = "grants"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("grant"))
    evaluator_id: Mapped[str] = mapped_column(ForeignKey("evaluators.id"), index=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"), index=True)
    version_ids: Mapped[list[str]] = mapped_column(default=list)
    variants: Mapped[list[str]] = mapped_column(default=list)
    scopes: Mapped[list[str]] = mapped_column(default=list)
    not_before: Mapped[datetime] = mapped_column(default=utcnow)
    not_after: Mapped[datetime | None] = mapped_column(nullable=True)
    tokens_used: Mapped[int] = mapped_column(BigInteger, default=0)
    terms: Mapped[dict[str, Any]] = mapped_column(default=dict)
    """Each capability's terms (quotas, switches, embargo) by name, defaults left out (``airlock.access.terms``)."""
    notes: Mapped[str] = mapped_column(Text, default="")
    created_by: Mapped[str] = mapped_column(String(100), default="")
    # The admin token that issued the grant (None: the operator's CLI); it may not review the grant's work.
    issued_by_token_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(nullable=True)
    revoked_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    # HMAC over every other column but the usage counter (airlock.access.seal), under a key the
    # database does not hold: a row edited outside the service no longer verifies.
    seal: Mapped[str | None] = mapped_column(String(100), nullable=True)

    evaluator: Mapped[Evaluator] = relationship(back_populates="grants")
    keys: Mapped[list[ApiKey]] = relationship(back_populates="grant")


class ApiKey(Base):
    """An evaluator API key bound to one grant; only its SHA-256 is stored."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("key"))
    grant_id: Mapped[str] = mapped_column(ForeignKey("grants.id"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    display_prefix: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(100), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(nullable=True)

    grant: Mapped[Grant] = relationship(back_populates="keys")


class AdminToken(Base):
    """A lab administrator's token for the admin API; only its SHA-256 is stored."""

    __tablename__ = "admin_tokens"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("adm"))
    name: Mapped[str] = mapped_column(String(100))
    role: Mapped[str] = mapped_column(String(32), default="admin")
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    display_prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(nullable=True)


class AuditEvent(Base):
    """One request to Airlock, allowed or denied."""

    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_grant_ts", "grant_id", "ts"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    ts: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    request_id: Mapped[str] = mapped_column(String(40))
    actor_type: Mapped[str] = mapped_column(String(16))  # evaluator | admin | anonymous | cli
    actor: Mapped[str | None] = mapped_column(String(100), nullable=True)
    evaluator_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    grant_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    key_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    method: Mapped[str] = mapped_column(String(8))
    path: Mapped[str] = mapped_column(String(200))
    model: Mapped[str | None] = mapped_column(String(200), nullable=True)
    version_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    variant: Mapped[str | None] = mapped_column(String(100), nullable=True)
    scope: Mapped[str | None] = mapped_column(String(32), nullable=True)
    status_code: Mapped[int] = mapped_column(Integer)
    outcome: Mapped[str] = mapped_column(String(32))  # allowed | denied | blocked | error
    error_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    tokens_in: Mapped[int] = mapped_column(Integer, default=0)
    tokens_out: Mapped[int] = mapped_column(Integer, default=0)
    latency_ms: Mapped[float] = mapped_column(Float, default=0.0)
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)
