"""Helpers shared by the report tests: a lab world in a database, signed results, tiny PNGs."""

from __future__ import annotations

import secrets
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from airlock.access import service as access
from airlock.access.service import Principal
from airlock.evals import service as evals
from airlock.evals.attestation import public_key_b64, sign
from airlock.evals.schemas import ResultEnvelope
from tests.conftest import FAKE_MANIFEST, grant_request
from tests.fakes import fake_attestation


def tiny_png() -> bytes:
    """A valid 1×1 greyscale PNG."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00\x80")) + chunk(b"IEND", b"")
    )


def attestation(grant_id: str, evaluator: str = "org-a", **overrides: Any) -> dict[str, Any]:
    """A complete attestation of a result about m1@v1/helpful-only."""
    return fake_attestation(grant_id, evaluator=evaluator, **{"log_sha256": secrets.token_hex(32), **overrides})


@dataclass
class Org:
    """An evaluator organisation with one grant, a key principal and a registered signing key."""

    name: str
    grant_id: str
    token: str
    private: Ed25519PrivateKey
    results: list[str] = field(default_factory=list)

    def principal(self, db: Any) -> Principal:
        """Authenticate this org's key (a fresh principal, as the gateway would build)."""
        with db.session() as session:
            return access.authenticate_key(session, self.token)

    def attest(self, db: Any, **overrides: Any) -> str:
        """Store a signed result of this org; returns its id."""
        env = sign(attestation(self.grant_id, self.name, **overrides), self.private)
        with db.session() as session:
            principal = access.authenticate_key(session, self.token)
            row = evals.submit_result(session, principal, ResultEnvelope.model_validate(env))
            self.results.append(row.id)
            return row.id


def make_org(db: Any, tmp: Path, name: str = "org-a", **grant: Any) -> Org:
    """Create an evaluator (if needed), a grant on m1 with a key, and register a signing key."""
    from airlock.evals.attestation import generate_key

    grant.setdefault("variants", ["production", "helpful-only"])
    grant.setdefault("scopes", ["sample"])
    with db.session() as session:
        try:
            evaluator = access.get_evaluator(session, name)
        except Exception:
            evaluator = access.create_evaluator(session, name)
        row = access.create_grant(session, grant_request(evaluator=name, model="m1", **grant))
        _key, token = access.create_api_key(session, row.id)
        private = generate_key(tmp / f"{name}-{row.id}.pem")
        evals.register_signing_key(session, evaluator.id, public_key_b64(private), registered_by="test")
        return Org(name=name, grant_id=row.id, token=token, private=private)


def sync_fake_manifest(db: Any) -> None:
    """Register the fake manifest's models (m1@v1 external-candidate, m2@v1)."""
    from airlock.registry.service import parse_manifest, sync_manifest

    with db.session() as session:
        sync_manifest(session, parse_manifest(FAKE_MANIFEST))
