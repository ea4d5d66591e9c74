"""The console's table: signed-in browser sessions, each bound to one evaluator key or lab token."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import String
from sqlalchemy.orm import Mapped, mapped_column

from airlock.db import Base, new_id, utcnow


class ConsoleSession(Base):
    """A browser session: only the SHA-256 of its cookie is stored, with its CSRF token and expiry."""

    __tablename__ = "console_sessions"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("cs"))
    cookie_hash: Mapped[str] = mapped_column(String(64), unique=True)
    kind: Mapped[str] = mapped_column(String(16))  # evaluator | lab
    credential_id: Mapped[str] = mapped_column(String(40), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(default=utcnow)
    ended_at: Mapped[datetime | None] = mapped_column(nullable=True)
