"""Ledger service: record events in the caller's transaction; sequence them into the Merkle log."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session


def record_event(
    session: Session, kind: str, body: dict[str, Any], *, confidential: dict[str, Any] | None = None
) -> None:
    """Queue a public ledger event in the caller's transaction (confidential fields become commitments)."""
