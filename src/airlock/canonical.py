"""One canonical JSON for everything Airlock hashes or signs: RFC 8785 (JCS), via the ``rfc8785`` library.

A verifier in any language with a JCS implementation reproduces the exact bytes. Before encoding,
values are checked and normalised in one place: aware datetimes become UTC ISO-8601 strings with a
``Z`` suffix, tuples and sets become lists (sets sorted), and anything JCS cannot represent exactly
(NaN, infinities, integers beyond 2^53 - 1, non-string keys, other types) is refused with a
:class:`CanonicalJSONError` that names the offending field.

Records written before this encoding used Python's sorted, compact ``json.dumps``; the two agree on
every value except some numbers (``1.0`` is ``1.0`` there and ``1`` here). :func:`legacy_bytes`
exists only so those records still verify; nothing new is written with it.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

import rfc8785

__all__ = [
    "MAX_SAFE_INTEGER",
    "CanonicalJSONError",
    "canonical_bytes",
    "canonical_forms",
    "canonical_text",
    "iso_utc",
    "legacy_bytes",
    "sha256_hex",
]

MAX_SAFE_INTEGER = 2**53 - 1
"""The largest integer every JSON reader represents exactly (IEEE 754 double)."""


class CanonicalJSONError(ValueError):
    """A value that canonical JSON cannot represent exactly; ``path`` names where it is."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


def iso_utc(value: datetime) -> str:
    """Format an aware datetime as UTC ISO-8601 with microseconds and a ``Z`` suffix."""
    return value.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _child(path: str, key: str) -> str:
    return f"{path}.{key}" if key.isidentifier() else f"{path}[{json.dumps(key, ensure_ascii=False)}]"


def _prepare(value: Any, path: str) -> Any:
    """Return ``value`` as plain JSON data, refusing what JCS cannot represent exactly."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        if abs(value) > MAX_SAFE_INTEGER:
            raise CanonicalJSONError(path, f"integer {value} is beyond 2^53 - 1 and cannot be represented exactly")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise CanonicalJSONError(path, f"{value} is not a JSON number (NaN and infinities are refused)")
        return value
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise CanonicalJSONError(path, "naive datetimes are refused (give a timezone)")
        return iso_utc(value)
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise CanonicalJSONError(path, f"key {key!r} is not a string")
            out[key] = _prepare(item, _child(path, key))
        return out
    if isinstance(value, (list, tuple)):
        return [_prepare(item, f"{path}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, (set, frozenset)):
        return [_prepare(item, f"{path}[{i}]") for i, item in enumerate(sorted(value))]
    raise CanonicalJSONError(path, f"{type(value).__name__} is not JSON data")


def canonical_bytes(data: Any) -> bytes:
    """Return the RFC 8785 canonical UTF-8 bytes of ``data`` (CanonicalJSONError naming the field)."""
    return rfc8785.dumps(_prepare(data, "$"))


def canonical_text(data: Any) -> str:
    """Return the canonical JSON of ``data`` as text."""
    return canonical_bytes(data).decode()


def sha256_hex(data: Any) -> str:
    """Return the SHA-256 (hex) of the canonical JSON of ``data``."""
    return hashlib.sha256(canonical_bytes(data)).hexdigest()


def legacy_bytes(data: Any) -> bytes:
    """Return the encoding of records written before RFC 8785 (for verifying them only)."""
    return json.dumps(
        _prepare(data, "$"), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def canonical_forms(data: Any) -> Iterator[bytes]:
    """Yield the encodings a stored hash or signature over ``data`` may have used, newest first."""
    current = canonical_bytes(data)
    yield current
    legacy = legacy_bytes(data)
    if legacy != current:
        yield legacy
