"""Console sign-in: an evaluator key or lab token exchanged for a session cookie, re-checked on every request."""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from airlock.access.service import (
    ADMIN_PREFIX,
    KEY_PREFIX,
    AdminPrincipal,
    Principal,
    authenticate_admin,
    authenticate_admin_id,
    authenticate_key,
    authenticate_key_id,
    hash_secret,
)
from airlock.console.models import ConsoleSession
from airlock.db import utcnow
from airlock.errors import AuthenticationError, PermissionDeniedError

COOKIE = "airlock_console"
IDLE_TIMEOUT = timedelta(minutes=30)
ABSOLUTE_TIMEOUT = timedelta(hours=8)


@dataclass(frozen=True)
class ConsoleUser:
    """Who a console request acts for: an evaluator key's principal or a lab token's, and the session's CSRF token."""

    session_id: str
    csrf_token: str
    evaluator: Principal | None = None
    lab: AdminPrincipal | None = None

    @property
    def name(self) -> str:
        """Return a display name."""
        if self.evaluator is not None:
            return self.evaluator.evaluator_name
        assert self.lab is not None
        return f"{self.lab.name} ({self.lab.role})"


def sign_in(session: Session, secret: str) -> tuple[ConsoleSession, str]:
    """Check an evaluator key or lab token and open a console session; return it and the cookie value."""
    secret = secret.strip()
    if secret.startswith(KEY_PREFIX):
        kind, credential_id = "evaluator", authenticate_key(session, secret).key_id
    elif secret.startswith(ADMIN_PREFIX):
        kind, credential_id = "lab", authenticate_admin(session, secret).token_id
    else:
        raise AuthenticationError(
            "that is neither an evaluator key (ak_…) nor a lab token (at_…); paste the whole key",
            code="invalid_credential",
        )
    cookie = secrets.token_urlsafe(32)
    now = utcnow()
    row = ConsoleSession(
        cookie_hash=hash_secret(cookie),
        kind=kind,
        credential_id=credential_id,
        csrf_token=secrets.token_urlsafe(32),
        created_at=now,
        expires_at=now + IDLE_TIMEOUT,
    )
    session.add(row)
    session.flush()
    return row, cookie


def current_user(session: Session, cookie: str | None) -> ConsoleUser | None:
    """Return the signed-in user of a cookie, or None when it is unknown, expired, ended or its credential revoked."""
    if not cookie:
        return None
    digest = hash_secret(cookie)
    row = session.scalar(select(ConsoleSession).where(ConsoleSession.cookie_hash == digest))
    now = utcnow()
    if row is None or not hmac.compare_digest(row.cookie_hash, digest) or row.ended_at is not None:
        return None
    if now >= row.expires_at or now >= row.created_at + ABSOLUTE_TIMEOUT:
        row.ended_at = now
        return None
    try:
        # The credential is re-checked on every request, so revoking a key or token ends its sessions at once.
        if row.kind == "evaluator":
            user = ConsoleUser(row.id, row.csrf_token, evaluator=authenticate_key_id(session, row.credential_id))
        else:
            user = ConsoleUser(row.id, row.csrf_token, lab=authenticate_admin_id(session, row.credential_id))
    except (AuthenticationError, PermissionDeniedError):
        row.ended_at = now
        return None
    row.expires_at = min(now + IDLE_TIMEOUT, row.created_at + ABSOLUTE_TIMEOUT)
    return user


def sign_out(session: Session, session_id: str) -> None:
    """End a console session."""
    row = session.get(ConsoleSession, session_id)
    if row is not None and row.ended_at is None:
        row.ended_at = utcnow()


def csrf_ok(user: ConsoleUser, submitted: str | None) -> bool:
    """Return whether a form's (or header's) CSRF token is this session's."""
    return bool(submitted) and hmac.compare_digest(user.csrf_token.encode(), (submitted or "").encode())
