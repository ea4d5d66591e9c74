"""Tables of the governance package: gate decisions taken at promotion attempts, and overrides."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import ForeignKey, Index, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from airlock.db import Base, new_id, utcnow


class GateDecision(Base):
    """The gate's verdict on one promotion attempt, with the full deterministic report."""

    __tablename__ = "gate_decisions"
    __table_args__ = (Index("ix_gate_decisions_version_created", "version_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("gdec"))
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    version_id: Mapped[str] = mapped_column(ForeignKey("model_versions.id", ondelete="CASCADE"))
    from_stage: Mapped[str] = mapped_column(String(32))
    stage: Mapped[str] = mapped_column(String(32))
    decision: Mapped[str] = mapped_column(String(16))  # allow | block
    promoted: Mapped[bool] = mapped_column(default=False)
    actor: Mapped[str] = mapped_column(String(100))
    report_sha256: Mapped[str] = mapped_column(String(64))
    policy_sha256: Mapped[str] = mapped_column(String(64))
    report: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Override(Base):
    """A decider's written decision to promote a version despite a blocking gate."""

    __tablename__ = "gate_overrides"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("govr"))
    decision_id: Mapped[str] = mapped_column(ForeignKey("gate_decisions.id", ondelete="CASCADE"), index=True)
    version_id: Mapped[str] = mapped_column(ForeignKey("model_versions.id", ondelete="CASCADE"), index=True)
    stage: Mapped[str] = mapped_column(String(32))
    decider: Mapped[str] = mapped_column(String(100))
    decider_role: Mapped[str] = mapped_column(String(32))
    decider_token_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    justification: Mapped[str] = mapped_column(Text)
    blocking: Mapped[list[str]] = mapped_column(default=list)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
