"""Ledger entry encoding shared by the service and the offline verifier: canonical JSON, commitments."""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import UTC, datetime
from typing import Any

from airlock.canonical import canonical_forms, canonical_text, iso_utc, legacy_bytes

__all__ = [
    "ENTRY_VERSION",
    "REQUIRED_FIELDS",
    "canonical",
    "commitment_of",
    "iso_utc",
    "parse_entry",
    "parse_time",
    "verify_opening",
]

ENTRY_VERSION = 2
"""Version 2 entries are RFC 8785 canonical JSON; version 1 entries used the legacy sorted form."""
REQUIRED_FIELDS = ("v", "id", "kind", "time", "body")


def parse_time(value: str) -> datetime:
    """Parse a UTC ISO-8601 time written by :func:`iso_utc` (or any aware ISO time)."""
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        raise ValueError(f"time {value!r} has no timezone")
    return parsed.astimezone(UTC)


def canonical(data: Any) -> str:
    """Return the canonical JSON text of ``data`` (RFC 8785; datetimes as UTC ISO-8601)."""
    return canonical_text(data)


def commitment_of(salt_hex: str, value_json: str) -> str:
    """Return the hex commitment ``SHA-256(salt || canonical JSON of the value)``."""
    return hashlib.sha256(bytes.fromhex(salt_hex) + value_json.encode()).hexdigest()


def verify_opening(commitment: str, salt_hex: str, value: Any) -> bool:
    """Return whether ``(salt, value)`` opens ``commitment``."""
    try:
        forms = list(canonical_forms(value))  # a commitment made before RFC 8785 used the legacy form
        expected = [commitment_of(salt_hex, form.decode()) for form in forms]
    except (ValueError, TypeError):
        return False
    return any(hmac.compare_digest(e, commitment) for e in expected)


def parse_entry(text: str) -> dict[str, Any]:
    """Parse one entry, insisting it is canonical and carries the required fields."""
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError("an entry must be a JSON object")
    missing = [f for f in REQUIRED_FIELDS if f not in data]
    if missing:
        raise ValueError(f"entry lacks {missing}")
    version = data["v"]
    if version == 1:
        form = legacy_bytes(data).decode()
    elif version == ENTRY_VERSION:
        form = canonical(data)
    else:
        raise ValueError(f"unknown entry version {version!r}")
    if form != text:
        raise ValueError("entry is not in canonical JSON form")
    return data
