"""Signed eval results: Ed25519 evaluator keys, canonical attestations, confidence intervals.

An attestation is a JSON object; its canonical form (sorted keys, no whitespace, UTF-8) is what
the evaluator signs. The lab verifies the signature against a public key registered to that
evaluator and checks the grant covered the variant and version before storing the result.
"""

from __future__ import annotations

import base64
import hashlib
import math
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from airlock.canonical import canonical_bytes, canonical_forms
from airlock.errors import InvalidRequestError

SCHEMA = "airlock.attestation/v1"


def file_sha256(path: Path) -> str:
    """Return the SHA-256 hex digest of a file, streamed."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------- keys


def generate_key(path: Path) -> Ed25519PrivateKey:
    """Create an Ed25519 key and write it as unencrypted PKCS#8 PEM readable only by the owner."""
    if path.exists():
        raise FileExistsError(f"{path} already exists; refusing to overwrite a signing key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    return key


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Read an Ed25519 private key written by :func:`generate_key`."""
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} does not hold an Ed25519 key")
    return key


def public_key_b64(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """Return the raw 32-byte public key, base64-encoded."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def parse_public_key(b64: str) -> Ed25519PublicKey:
    """Parse a base64 raw Ed25519 public key (400 on anything else)."""
    try:
        raw = base64.b64decode(b64, validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        raise InvalidRequestError("public_key must be a base64-encoded raw 32-byte Ed25519 key") from None


def fingerprint(public_b64: str) -> str:
    """Return the SHA-256 hex fingerprint of a raw public key."""
    return hashlib.sha256(base64.b64decode(public_b64)).hexdigest()


def sign(attestation: dict[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    """Return the signed envelope ``{attestation, signature, public_key}``."""
    signature = key.sign(canonical_bytes(attestation))
    return {
        "attestation": attestation,
        "signature": base64.b64encode(signature).decode(),
        "public_key": public_key_b64(key),
    }


def verify(envelope_attestation: dict[str, Any], signature_b64: str, public_b64: str) -> bool:
    """Return whether ``signature_b64`` is a valid signature of the attestation by ``public_b64``."""
    try:
        signature = base64.b64decode(signature_b64, validate=True)
        public = parse_public_key(public_b64)
        # Attestations signed before RFC 8785 used the legacy form of the same data: either verifies it.
        forms = list(canonical_forms(envelope_attestation))
    except (ValueError, InvalidRequestError):
        return False
    for form in forms:
        try:
            public.verify(signature, form)
            return True
        except InvalidSignature:
            continue
    return False


# ---------------------------------------------------------------- statistics


def wilson_interval(successes: float, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Return the Wilson score 95 % interval for a proportion (well-behaved at 0, 1 and small n)."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap_interval(
    values: Sequence[float], *, resamples: int = 2000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float]:
    """Return a percentile-bootstrap 95 % interval of the mean (seeded, so reproducible)."""
    n = len(values)
    if n == 0:
        return (math.nan, math.nan)
    if n == 1:
        return (values[0], values[0])
    rng = random.Random(seed)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    lo = means[int((alpha / 2) * resamples)]
    hi = means[min(resamples - 1, int((1 - alpha / 2) * resamples))]
    return (lo, hi)


def mean_with_ci(values: Sequence[float]) -> dict[str, Any]:
    """Return ``{value, ci95, method, n}``: Wilson for 0/1 scores, bootstrap otherwise."""
    n = len(values)
    mean = sum(values) / n if n else math.nan
    if n and all(v in (0.0, 1.0) for v in values):
        lo, hi = wilson_interval(sum(values), n)
        method = "wilson"
    else:
        lo, hi = bootstrap_interval(values)
        method = "bootstrap"
    return {"value": mean, "ci95": [lo, hi], "method": method, "n": n}


def paired_difference(a: Sequence[float], b: Sequence[float], *, seed: int = 0) -> dict[str, Any]:
    """Return mean(b - a) over paired samples with a percentile-bootstrap 95 % interval."""
    if len(a) != len(b):
        raise ValueError("paired samples must have equal length")
    diffs = [y - x for x, y in zip(a, b, strict=True)]
    n = len(diffs)
    mean = sum(diffs) / n if n else math.nan
    lo, hi = bootstrap_interval(diffs, seed=seed)
    return {"value": mean, "ci95": [lo, hi], "method": "paired-bootstrap", "n": n}
