"""Agreement on a grant's terms: the lab proposes them, the evaluator accepts with a signature, the ledger records it.

The **proposal** is the grant's terms as one canonical document (``airlock.grant-terms/v1``: who,
which model, versions, variants and scopes, the window, and every term with its default filled
in); its SHA-256 over RFC 8785 bytes is ``terms_sha256``. The evaluator accepts by signing, with
the Ed25519 key its organisation registered, the canonical **acceptance document**::

    {"format": "airlock.grant-acceptance/v1", "grant_id": ..., "terms_sha256": ...,
     "seal_public_key": ..., "accepted_at": ...}

which also hands the lab the X25519 public key that ``sealed`` content is encrypted to. An
acceptance counts only while its ``terms_sha256`` is the hash of the grant's *current* proposal, so
any change to the terms voids it. Work whose retention term is ``sealed`` or ``full`` (the lab keeps
content) is refused until a current acceptance exists (:func:`require_acceptance`); ``none`` is the
floor the lab owes anyway and needs none.

This package sits below ``evals``, which owns the registered signing keys: the interface layer
looks the caller's key up and passes the registered public key down (:class:`SignerKey`), and the
signature is checked here with ``cryptography``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import ForeignKey, String, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from airlock.access import events
from airlock.access.models import Grant
from airlock.access.retention import RetentionTerms
from airlock.access.terms import all_terms, terms_of
from airlock.canonical import canonical_bytes, canonical_text, iso_utc, sha256_hex
from airlock.db import Base, new_id, utcnow
from airlock.errors import ConflictError, InvalidRequestError, PermissionDeniedError
from airlock.ledger.service import logged_events

__all__ = [
    "ACCEPTANCE_FORMAT",
    "CLOCK_SKEW",
    "KEEPING_MODES",
    "MAX_AGE",
    "TERMS_FORMAT",
    "GrantAcceptance",
    "SignerKey",
    "TermsNotAcceptedError",
    "accept",
    "acceptance_document",
    "acceptances_of",
    "check_acceptances",
    "current_acceptance",
    "proposal",
    "require_acceptance",
    "sealing_public_key",
    "terms_sha256",
    "verify_acceptance",
]

TERMS_FORMAT = "airlock.grant-terms/v1"
ACCEPTANCE_FORMAT = "airlock.grant-acceptance/v1"
KEEPING_MODES = frozenset({"sealed", "full"})
"""Retention modes under which the lab keeps content, so the evaluator must have accepted the terms."""
CLOCK_SKEW = timedelta(minutes=5)
"""How far in the future an ``accepted_at`` may be (the evaluator's clock may run ahead)."""
MAX_AGE = timedelta(hours=1)
"""How old an ``accepted_at`` may be when it arrives: an acceptance is signed just before it is sent."""


class GrantAcceptance(Base):
    """An evaluator's signed acceptance of a grant's proposed terms (valid while the terms are unchanged)."""

    __tablename__ = "grant_acceptances"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("gacc"))
    grant_id: Mapped[str] = mapped_column(ForeignKey("grants.id"), index=True)
    evaluator_id: Mapped[str] = mapped_column(String(40))
    terms_sha256: Mapped[str] = mapped_column(String(64))
    """SHA-256 (hex) of the canonical proposal the evaluator accepted."""
    signing_key_fingerprint: Mapped[str] = mapped_column(String(64))
    seal_public_key: Mapped[str] = mapped_column(String(64))
    """Base64 of the raw 32-byte X25519 public key ``sealed`` content is encrypted to."""
    signature: Mapped[str] = mapped_column(String(100))
    """Base64 Ed25519 signature over the canonical acceptance document."""
    accepted_at: Mapped[datetime] = mapped_column(default=utcnow)


class TermsNotAcceptedError(PermissionDeniedError):
    """Work under a retention term that keeps content, on a grant whose evaluator has not accepted its terms."""

    default_code = "terms_not_accepted"


@dataclass(frozen=True)
class SignerKey:
    """A signing key the interface layer found registered to an evaluator (``evals`` owns the table)."""

    evaluator_id: str
    public_key: str
    """Base64 of the raw 32-byte Ed25519 public key."""
    fingerprint: str
    revoked: bool = False


# ---------------------------------------------------------------- the documents


def _plain(value: Any) -> Any:
    """Return ``value`` as the JSON data its canonical form holds (datetimes as UTC ISO strings)."""
    return json.loads(canonical_text(value))


def proposal(grant: Grant) -> dict[str, Any]:
    """Return the canonical terms document the lab proposes for ``grant`` (plain JSON data, every term filled in)."""
    terms: dict[str, Any] = {}
    for section in all_terms().values():
        terms.update(terms_of(grant, section).model_dump(mode="json"))
    document: dict[str, Any] = _plain(
        {
            "format": TERMS_FORMAT,
            "grant_id": grant.id,
            "evaluator_id": grant.evaluator_id,
            "model_id": grant.model_id,
            "version_ids": list(grant.version_ids),
            "variants": list(grant.variants),
            "scopes": list(grant.scopes),
            "not_before": grant.not_before,
            "not_after": grant.not_after,
            "terms": dict(sorted(terms.items())),
        }
    )
    return document


def terms_sha256(grant: Grant) -> str:
    """Return the SHA-256 (hex) of the canonical proposal of ``grant``: what an acceptance signs."""
    return sha256_hex(proposal(grant))


def acceptance_document(grant_id: str, terms_digest: str, seal_public_key: str, accepted_at: str) -> dict[str, Any]:
    """Return the acceptance document whose RFC 8785 bytes the evaluator signs."""
    return {
        "format": ACCEPTANCE_FORMAT,
        "grant_id": grant_id,
        "terms_sha256": terms_digest,
        "seal_public_key": seal_public_key,
        "accepted_at": accepted_at,
    }


def verify_acceptance(document: dict[str, Any], signature_b64: str, public_key_b64: str) -> bool:
    """Return whether ``signature_b64`` is the Ed25519 signature of ``document`` by ``public_key_b64``."""
    try:
        signature = base64.b64decode(signature_b64, validate=True)
        public = Ed25519PublicKey.from_public_bytes(base64.b64decode(public_key_b64, validate=True))
        public.verify(signature, canonical_bytes(document))
    except (ValueError, binascii.Error, InvalidSignature):
        return False
    return True


# ---------------------------------------------------------------- reading the state


def current_acceptance(session: Session, grant: Grant) -> GrantAcceptance | None:
    """Return the newest acceptance of ``grant``'s current terms, or None (a change to the terms voids older ones)."""
    digest = terms_sha256(grant)
    return session.scalars(
        select(GrantAcceptance)
        .where(GrantAcceptance.grant_id == grant.id, GrantAcceptance.terms_sha256 == digest)
        .order_by(GrantAcceptance.accepted_at.desc(), GrantAcceptance.id.desc())
        .limit(1)
    ).first()


def sealing_public_key(session: Session, grant: Grant) -> bytes | None:
    """Return the raw 32-byte X25519 key of the current acceptance of ``grant``, or None."""
    row = current_acceptance(session, grant)
    return base64.b64decode(row.seal_public_key) if row is not None else None


def require_acceptance(session: Session, grant: Grant, term: str) -> None:
    """Refuse (403 ``terms_not_accepted``) work under a retention ``term`` keeping content until terms are accepted."""
    mode = getattr(terms_of(grant, RetentionTerms), term)
    if mode not in KEEPING_MODES or current_acceptance(session, grant) is not None:
        return
    raise TermsNotAcceptedError(
        f"grant {grant.id} lets the lab keep content under {term}={mode}, so its evaluator must first accept "
        f"the grant's terms: read them with `airlock grant terms-proposed`, then sign with "
        f"`airlock grant accept {grant.id}` (POST /v1/airlock/grant/accept); a change to the terms "
        "voids an earlier acceptance",
        param=term,
    )


# ---------------------------------------------------------------- accepting


def _parse_seal_key(value: str) -> bytes:
    try:
        raw = base64.b64decode(value, validate=True)
    except (ValueError, binascii.Error):
        raw = b""
    # All zeros is X25519's identity point: anything sealed to it would be readable by anyone.
    if len(raw) != 32 or raw == bytes(32):
        raise InvalidRequestError(
            "seal_public_key must be the base64 of a raw 32-byte X25519 public key", param="seal_public_key"
        )
    return raw


def _parse_accepted_at(value: str, now: datetime) -> datetime:
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        when = None
    if when is None or when.tzinfo is None or iso_utc(when) != value:
        example = iso_utc(now)
        raise InvalidRequestError(
            f"accepted_at must be UTC ISO-8601 with microseconds and a Z suffix, as signed (e.g. {example})",
            param="accepted_at",
        )
    if when > now + CLOCK_SKEW or when < now - MAX_AGE:
        raise InvalidRequestError(
            f"accepted_at {value} is not current (the gateway's time is {iso_utc(now)}): sign the acceptance "
            "again and send it at once",
            code="stale_acceptance",
            param="accepted_at",
        )
    return when


def accept(
    session: Session,
    grant: Grant,
    signer: SignerKey,
    *,
    terms_digest: str,
    seal_public_key: str,
    accepted_at: str,
    signature: str,
    now: datetime | None = None,
) -> GrantAcceptance:
    """Record the evaluator's signed acceptance of ``grant``'s current terms and log ``grant.accepted``.

    ``signer`` is the key the interface found registered under the fingerprint the caller named.
    Refused: a key of another organisation or a revoked one (403), terms that changed since the
    evaluator read them (409 ``terms_changed``), a malformed or stale field or a signature that does
    not verify (400). Sending the same signed acceptance again returns the recorded one.
    """
    if signer.evaluator_id != grant.evaluator_id:
        raise PermissionDeniedError(
            "the signing key is not registered to your organisation (run `airlock evaluator keygen --register`)",
            code="unknown_signing_key",
        )
    if signer.revoked:
        raise PermissionDeniedError("the signing key has been revoked", code="signing_key_revoked")
    current = terms_sha256(grant)
    if terms_digest != current:
        raise ConflictError(
            f"the terms of grant {grant.id} are not the ones you signed (you accepted {terms_digest[:12]}…, "
            f"the current terms hash to {current[:12]}…): they changed since you read them; read them again "
            "with `airlock grant terms-proposed` and accept those",
            code="terms_changed",
            param="terms_sha256",
        )
    _parse_seal_key(seal_public_key)
    when = _parse_accepted_at(accepted_at, now or utcnow())
    document = acceptance_document(grant.id, terms_digest, seal_public_key, accepted_at)
    if not verify_acceptance(document, signature, signer.public_key):
        raise InvalidRequestError(
            "the signature does not match the acceptance document: it was altered or signed with another key",
            code="invalid_signature",
            param="signature",
        )
    existing = session.scalars(
        select(GrantAcceptance).where(GrantAcceptance.grant_id == grant.id, GrantAcceptance.signature == signature)
    ).first()
    if existing is not None:
        return existing
    row = GrantAcceptance(
        grant_id=grant.id,
        evaluator_id=grant.evaluator_id,
        terms_sha256=terms_digest,
        signing_key_fingerprint=signer.fingerprint,
        seal_public_key=seal_public_key,
        signature=signature,
        accepted_at=when,
    )
    session.add(row)
    session.flush()
    events.grant_accepted(
        session,
        grant,
        {
            **document,
            "key_fingerprint": signer.fingerprint,
            "signing_public_key": signer.public_key,
            "signature": signature,
        },
    )
    return row


# ---------------------------------------------------------------- the lab-side check


def check_acceptances(session: Session, signer_of: Callable[[str], SignerKey | None]) -> list[str]:
    """Check every logged ``grant.accepted`` and every acceptance row; one line per problem.

    Each logged acceptance must verify under the key registered with its fingerprint (found by
    ``signer_of``), belong to the grant's evaluator, and accept the terms the grant was issued with
    (the grant's proposal; ``airlock ledger check`` compares the grant with ``grant.issued``
    separately). Each row must have its ledger entry, and the two must agree.
    """
    problems: list[str] = []
    logged: dict[str, dict[str, Any]] = {}
    for event in logged_events(session, ("grant.accepted",)):
        body = event.body
        where = f"grant.accepted {event.event_id}"
        signature = body.get("signature")
        if isinstance(signature, str):
            logged[signature] = body
        grant = session.get(Grant, str(body.get("grant")))
        if grant is None:
            problems.append(f"{where}: the database has no grant {body.get('grant')}")
            continue
        problems += [f"{where} (grant {grant.id}): {p}" for p in _event_problems(body, grant, signer_of)]
    rows = session.scalars(select(GrantAcceptance).order_by(GrantAcceptance.accepted_at, GrantAcceptance.id))
    for row in rows:
        entry = logged.get(row.signature)
        if entry is None:
            problems.append(f"acceptance {row.id} of grant {row.grant_id} has no grant.accepted entry in the ledger")
            continue
        recorded = {
            "grant": row.grant_id,
            "terms_sha256": row.terms_sha256,
            "key_fingerprint": row.signing_key_fingerprint,
            "seal_public_key": row.seal_public_key,
            "accepted_at": iso_utc(row.accepted_at),
        }
        differs = sorted(name for name, value in recorded.items() if entry.get(name) != value)
        if differs:
            problems.append(f"acceptance {row.id} of grant {row.grant_id} differs from its ledger entry: {differs}")
    return problems


def _event_problems(body: dict[str, Any], grant: Grant, signer_of: Callable[[str], SignerKey | None]) -> list[str]:
    """Return what is wrong with one logged acceptance of ``grant``."""
    problems: list[str] = []
    fingerprint = str(body.get("key_fingerprint", ""))
    public_key = str(body.get("signing_public_key", ""))
    signer = signer_of(fingerprint)
    if signer is None:
        problems.append(f"signed with key {fingerprint[:12]}…, which is not registered")
    else:
        if signer.public_key != public_key:
            problems.append("the logged public key is not the one registered under its fingerprint")
        if signer.evaluator_id != grant.evaluator_id:
            problems.append("signed with a key registered to another evaluator")
    try:
        if hashlib.sha256(base64.b64decode(public_key, validate=True)).hexdigest() != fingerprint:
            problems.append("the logged public key does not match its fingerprint")
    except (ValueError, binascii.Error):
        problems.append("the logged public key is not base64")
    document = acceptance_document(
        grant.id,
        str(body.get("terms_sha256", "")),
        str(body.get("seal_public_key", "")),
        str(body.get("accepted_at", "")),
    )
    key = signer.public_key if signer is not None else public_key
    if not verify_acceptance(document, str(body.get("signature", "")), key):
        problems.append("its signature does not verify")
    if body.get("terms_sha256") != terms_sha256(grant):
        problems.append("it accepts terms other than the grant's (the grant's terms differ from what was accepted)")
    return problems


def acceptances_of(session: Session, grant_ids: Iterable[str]) -> dict[str, GrantAcceptance]:
    """Return the newest acceptance per grant among ``grant_ids`` (current or not; callers compare the hash)."""
    found: dict[str, GrantAcceptance] = {}
    ids = list(grant_ids)
    for start in range(0, len(ids), 500):
        stmt = (
            select(GrantAcceptance)
            .where(GrantAcceptance.grant_id.in_(ids[start : start + 500]))
            .order_by(GrantAcceptance.accepted_at, GrantAcceptance.id)
        )
        for row in session.scalars(stmt):
            found[row.grant_id] = row
    return found
