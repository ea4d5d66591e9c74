"""Ledger entry encoding shared by the service and the offline verifier: canonical JSON, commitments."""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import UTC, datetime
from typing import Any

ENTRY_VERSION = 1
REQUIRED_FIELDS = ("v", "id", "kind", "time", "body")


def iso_utc(value: datetime) -> str:
    """Format an aware datetime as UTC ISO-8601 with microseconds and a ``Z`` suffix."""
    return value.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def parse_time(value: str) -> datetime:
    """Parse a UTC ISO-8601 time written by :func:`iso_utc` (or any aware ISO time)."""
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        raise ValueError(f"time {value!r} has no timezone")
    return parsed.astimezone(UTC)


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise TypeError("naive datetimes are not accepted in ledger entries")
        return iso_utc(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable in a ledger entry")


def canonical(data: Any) -> str:
    """Return canonical JSON text: sorted keys, no whitespace, UTF-8, datetimes as UTC ISO-8601."""
    return json.dumps(
        data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_json_default
    )


def commitment_of(salt_hex: str, value_json: str) -> str:
    """Return the hex commitment ``SHA-256(salt || canonical JSON of the value)``."""
    return hashlib.sha256(bytes.fromhex(salt_hex) + value_json.encode()).hexdigest()


def verify_opening(commitment: str, salt_hex: str, value: Any) -> bool:
    """Return whether ``(salt, value)`` opens ``commitment``."""
    try:
        expected = commitment_of(salt_hex, canonical(value))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(expected, commitment)


def parse_entry(text: str) -> dict[str, Any]:
    """Parse one entry, insisting it is canonical and carries the required fields."""
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError("an entry must be a JSON object")
    missing = [f for f in REQUIRED_FIELDS if f not in data]
    if missing:
        raise ValueError(f"entry lacks {missing}")
    if canonical(data) != text:
        raise ValueError("entry is not in canonical JSON form")
    return data
