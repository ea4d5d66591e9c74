"""Each grant's watermark key: derived from the lab secret that seals grants, never stored anywhere."""

from __future__ import annotations

from sqlalchemy.orm import Session

from airlock.access.seal import sealer_for

__all__ = ["WATERMARK_PURPOSE", "watermark_key"]

WATERMARK_PURPOSE = "watermark"


def watermark_key(session: Session, grant_id: str) -> bytes:
    """Return the watermark key of ``grant_id`` (HMAC of the grant id under the database's grant seal key)."""
    return sealer_for(session).key.derive(WATERMARK_PURPOSE, grant_id)
