"""Red-teaming tables: sessions with a granted variant, their transcript turns, and findings with their triage."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from airlock.db import Base, new_id, utcnow


class RedteamSession(Base):
    """One red-teamer's conversation with one variant, or with two side by side (same prompt to both)."""

    __tablename__ = "redteam_sessions"
    __table_args__ = (Index("ix_redteam_sessions_key_created", "key_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("rts"))
    grant_id: Mapped[str] = mapped_column(ForeignKey("grants.id"), index=True)
    # The red-teamer is the API key: each expert gets their own key (and hour budget) on the grant.
    key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"))
    evaluator_id: Mapped[str] = mapped_column(ForeignKey("evaluators.id"), index=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"))
    version_id: Mapped[str] = mapped_column(ForeignKey("model_versions.id"), index=True)
    targets: Mapped[list[str]] = mapped_column(default=list)
    """The model ids the session talks to, as the red-teamer named them (``m@v/variant``)."""
    variants: Mapped[list[str]] = mapped_column(default=list)
    title: Mapped[str] = mapped_column(String(200), default="")
    status: Mapped[str] = mapped_column(String(16), default="open")  # open | closed
    active_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    turns: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_activity_at: Mapped[datetime] = mapped_column(default=utcnow)
    closed_at: Mapped[datetime | None] = mapped_column(nullable=True)


class RedteamTurn(Base):
    """One prompt of a session and each variant's answer, kept as the transcript."""

    __tablename__ = "redteam_turns"
    __table_args__ = (Index("ix_redteam_turns_session_index", "session_id", "index", unique=True),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("rtt"))
    session_id: Mapped[str] = mapped_column(ForeignKey("redteam_sessions.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    prompt: Mapped[str] = mapped_column(Text)
    responses: Mapped[list[dict[str, Any]]] = mapped_column(JSON(), default=list)
    """One ``{variant, content, blocked, finish_reason, tokens_in, tokens_out}`` per variant, in session order."""
    active_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class RedteamFinding(Base):
    """A red-teamer's flag on one turn's answer of one variant, and the lab's triage of it."""

    __tablename__ = "redteam_findings"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("rtf"))
    session_id: Mapped[str] = mapped_column(ForeignKey("redteam_sessions.id"), index=True)
    turn_id: Mapped[str] = mapped_column(ForeignKey("redteam_turns.id"))
    turn_index: Mapped[int] = mapped_column(Integer)
    grant_id: Mapped[str] = mapped_column(ForeignKey("grants.id"), index=True)
    key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"))
    evaluator_id: Mapped[str] = mapped_column(ForeignKey("evaluators.id"))
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"), index=True)
    version_id: Mapped[str] = mapped_column(ForeignKey("model_versions.id"))
    variant: Mapped[str] = mapped_column(String(100))
    category: Mapped[str] = mapped_column(String(16))
    severity: Mapped[str] = mapped_column(String(16))
    title: Mapped[str] = mapped_column(String(200))
    notes: Mapped[str] = mapped_column(Text, default="")
    status: Mapped[str] = mapped_column(String(16), default="open")  # open | acknowledged | disputed | fixed
    triage_reason: Mapped[str] = mapped_column(Text, default="")
    fixed_in_version_id: Mapped[str | None] = mapped_column(ForeignKey("model_versions.id"), nullable=True)
    triaged_by: Mapped[str | None] = mapped_column(String(100), nullable=True)
    triaged_at: Mapped[datetime | None] = mapped_column(nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
