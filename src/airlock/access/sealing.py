"""Sealed retention: content encrypted to the evaluator's X25519 key, stored unreadable, released item by item.

Under ``sealed`` retention the lab keeps a piece of content (a training file, interp code, a
red-team transcript...) only as a libsodium sealed box (PyNaCl ``SealedBox``) to the seal public
key the evaluator gave when it accepted the grant's terms. The lab holds no private key, so it
cannot read what it stores; the evaluator fetches the ciphertext, decrypts it locally and, if it
chooses, releases an item by sending the plaintext back. The lab checks it against the SHA-256
recorded at sealing, keeps it readable from then on, and records ``sealed.released`` in the ledger.

Where the ciphertext lives: in the artifact store (``<artifacts>/sealed/<id>.sealed``), the same
store every node mounts and where the plaintext it replaces lived, so a sealed interp result or
training file costs the database one small row rather than megabytes in every dump and backup. The
file is written (temporary name, then renamed) before the row commits and removed if the
transaction rolls back, so a row never names a missing file and a failed seal leaves nothing.

One function decides what happens to content on every path: :func:`disposition` answers ``keep``
(``full``), ``seal`` (``sealed`` with a current seal key) or ``drop`` (``none``, a grant whose seal
fails, or ``sealed`` with no key to seal to: fail closed, said in the ledger as ``sealed.dropped``).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal

from nacl.exceptions import CryptoError
from nacl.public import PublicKey, SealedBox
from sqlalchemy import BigInteger, ForeignKey, String, event, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from airlock.access.acceptance import sealing_public_key
from airlock.access.models import Grant
from airlock.access.retention import RetentionTerms
from airlock.access.seal import GrantIntegrityError, verified_grant
from airlock.access.terms import terms_of
from airlock.atomicfile import write_atomically
from airlock.config import get_settings
from airlock.db import Base, new_id, utcnow
from airlock.errors import ConflictError, InvalidRequestError, NotFoundError
from airlock.ledger import service as ledger

__all__ = [
    "CAPABILITIES",
    "Action",
    "Disposition",
    "NoSealingKeyError",
    "SealedItem",
    "ciphertext",
    "dispose",
    "disposition",
    "get_item",
    "items_of_grant",
    "list_items",
    "own_item",
    "release",
    "released_content",
    "seal_bytes",
    "seal_content",
    "sealed_dir",
]

log = logging.getLogger(__name__)

Action = Literal["keep", "seal", "drop"]
CAPABILITIES: dict[str, str] = {
    "finetune": "retention_finetune",
    "interp": "retention_interp",
    "evals": "retention_evals",
    "redteam": "retention_redteam",
}
"""Each capability that can keep content, and the retention term that governs it."""
NO_KEY = (
    "sealed retention was agreed but the grant has no current acceptance carrying a seal key: "
    "the content was dropped, not kept readable"
)


class SealedItem(Base):
    """One piece of an evaluator's content the lab stores sealed to the evaluator's key (ciphertext on disk)."""

    __tablename__ = "sealed_items"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("sld"))
    grant_id: Mapped[str] = mapped_column(ForeignKey("grants.id"), index=True)
    evaluator_id: Mapped[str] = mapped_column(ForeignKey("evaluators.id"), index=True)
    capability: Mapped[str] = mapped_column(String(16))
    kind: Mapped[str] = mapped_column(String(40))
    """What the content is: ``training_file``, ``interp_code``, ``interp_args``, ``interp_result``, ..."""
    ref: Mapped[str] = mapped_column(String(80), index=True)
    """The object it came from: a file, job or session id."""
    name: Mapped[str] = mapped_column(String(200), default="")
    plaintext_sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    """Plaintext bytes."""
    recipient_sha256: Mapped[str] = mapped_column(String(64))
    """SHA-256 of the 32-byte X25519 public key the content is sealed to (which seal key opens it)."""
    ciphertext_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    released_at: Mapped[datetime | None] = mapped_column(nullable=True)
    released_by: Mapped[str | None] = mapped_column(String(200), nullable=True)


class NoSealingKeyError(ConflictError):
    """The grant's terms say ``sealed`` but no current acceptance carries a seal key."""

    default_code = "no_sealing_key"


# ---------------------------------------------------------------- storage


def sealed_dir(home: Path | None = None) -> Path:
    """Return the artifact-store directory holding sealed items (and released plaintext)."""
    return (home if home is not None else get_settings().artifacts_dir) / "sealed"


def _ciphertext_path(home: Path | None, item_id: str) -> Path:
    return sealed_dir(home) / f"{item_id}.sealed"


def _released_path(home: Path | None, item_id: str) -> Path:
    return sealed_dir(home) / f"{item_id}.released"


def _undo_on_rollback(session: Session, undo: Callable[[], None]) -> None:
    """Run ``undo`` if the session's transaction rolls back; not once it has committed."""
    # Listeners cannot be removed while the session dispatches an event: a flag retires them instead.
    settled = [False]

    def rolled_back(_session: Session) -> None:
        if not settled[0]:
            settled[0] = True
            undo()

    def committed(_session: Session) -> None:
        settled[0] = True

    event.listen(session, "after_rollback", rolled_back, once=True)
    event.listen(session, "after_commit", committed, once=True)


# ---------------------------------------------------------------- sealing


def seal_bytes(
    session: Session,
    *,
    grant_id: str,
    evaluator_id: str,
    public_key: bytes,
    capability: str,
    kind: str,
    ref: str,
    name: str,
    data: bytes,
    home: Path | None = None,
) -> SealedItem:
    """Seal ``data`` to ``public_key``, store the ciphertext, add its row and log ``sealed.stored`` (no content)."""
    if capability not in CAPABILITIES:
        raise ValueError(f"unknown capability {capability!r}")
    if len(public_key) != 32:
        raise ValueError("a seal public key is 32 raw bytes (X25519)")
    sealed = SealedBox(PublicKey(public_key)).encrypt(data)
    item = SealedItem(
        id=new_id("sld"),
        grant_id=grant_id,
        evaluator_id=evaluator_id,
        capability=capability,
        kind=kind,
        ref=ref,
        name=name[:200],
        plaintext_sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        recipient_sha256=hashlib.sha256(public_key).hexdigest(),
        ciphertext_sha256=hashlib.sha256(sealed).hexdigest(),
        created_at=utcnow(),
    )
    path = _ciphertext_path(home, item.id)
    write_atomically(path, sealed)
    _undo_on_rollback(session, lambda: path.unlink(missing_ok=True))
    session.add(item)
    session.flush()
    body = {
        "item": item.id,
        "grant": grant_id,
        "evaluator": evaluator_id,
        "capability": capability,
        "kind": kind,
        "ref": ref,
        "sha256": item.plaintext_sha256,
        "size": item.size,
        "recipient_sha256": item.recipient_sha256,
    }
    ledger.record_event(session, "sealed.stored", body)
    return item


def seal_content(
    session: Session,
    grant: Grant,
    *,
    capability: str,
    kind: str,
    ref: str,
    name: str,
    data: bytes,
    home: Path | None = None,
) -> SealedItem:
    """Seal ``data`` to the grant's current seal key (:class:`NoSealingKeyError` when it has none)."""
    public_key = sealing_public_key(session, grant)
    if public_key is None:
        raise NoSealingKeyError(f"grant {grant.id}: {NO_KEY}")
    return seal_bytes(
        session,
        grant_id=grant.id,
        evaluator_id=grant.evaluator_id,
        public_key=public_key,
        capability=capability,
        kind=kind,
        ref=ref,
        name=name,
        data=data,
        home=home,
    )


# ---------------------------------------------------------------- the one decision per path


@dataclass(frozen=True)
class Disposition:
    """What a path does with content once the work no longer needs it: keep, seal (to ``public_key``) or drop."""

    action: Action
    capability: str
    grant: Grant | None = None
    public_key: bytes | None = None
    reason: str = ""
    """Why content is dropped although the terms say ``sealed`` (empty otherwise)."""


def disposition(session: Session, grant_id: str, capability: str) -> Disposition:
    """Decide, from the (seal-checked) grant's retention term for ``capability``, whether to keep, seal or drop.

    ``full`` keeps; ``none`` drops; ``sealed`` seals to the current acceptance's seal key, or drops
    when there is none (fail closed: nothing stays readable that was promised sealed). A missing
    grant or one whose integrity seal fails drops: on doubt the lab holds less, not more.
    """
    term = CAPABILITIES[capability]
    try:
        grant = verified_grant(session, grant_id)
    except GrantIntegrityError:
        return Disposition("drop", capability)
    if grant is None:
        return Disposition("drop", capability)
    mode = getattr(terms_of(grant, RetentionTerms), term)
    if mode == "full":
        return Disposition("keep", capability, grant)
    if mode != "sealed":
        return Disposition("drop", capability, grant)
    public_key = sealing_public_key(session, grant)
    if public_key is None:
        return Disposition("drop", capability, grant, reason=NO_KEY)
    return Disposition("seal", capability, grant, public_key)


def dispose(
    session: Session,
    plan: Disposition,
    *,
    kind: str,
    ref: str,
    name: str,
    data: bytes,
    home: Path | None = None,
) -> SealedItem | None:
    """Seal ``data`` when ``plan`` says so and return the item; otherwise return None (the caller drops it).

    Whatever happens here, the caller deletes its plaintext unless ``plan.action`` is ``keep``. A
    seal that cannot be made (no key, a malformed key, the store not writable) is logged as
    ``sealed.dropped`` with the reason, so the public record says the content is gone rather than sealed.
    """
    if plan.action != "seal" or plan.grant is None or plan.public_key is None:
        if plan.reason and plan.grant is not None:
            _dropped(session, plan, kind=kind, ref=ref, reason=plan.reason)
        return None
    try:
        # seal_bytes encrypts and writes the file before it touches the session: a failure adds nothing.
        return seal_bytes(
            session,
            grant_id=plan.grant.id,
            evaluator_id=plan.grant.evaluator_id,
            public_key=plan.public_key,
            capability=plan.capability,
            kind=kind,
            ref=ref,
            name=name,
            data=data,
            home=home,
        )
    except (CryptoError, ValueError, OSError) as exc:
        # Never the content, never the exception text of a library that might quote it: the type only.
        log.error("sealing %s of %s failed (%s); the content is dropped", kind, ref, type(exc).__name__)
        _dropped(session, plan, kind=kind, ref=ref, reason=f"sealing failed ({type(exc).__name__}); content dropped")
        return None


def _dropped(session: Session, plan: Disposition, *, kind: str, ref: str, reason: str) -> None:
    assert plan.grant is not None
    body = {"grant": plan.grant.id, "capability": plan.capability, "kind": kind, "ref": ref, "reason": reason}
    ledger.record_event(session, "sealed.dropped", body)


# ---------------------------------------------------------------- reading and release


def get_item(session: Session, item_id: str) -> SealedItem:
    """Return a sealed item by id (404 ``sealed_item_not_found``)."""
    item = session.get(SealedItem, item_id)
    if item is None:
        raise NotFoundError(f"sealed item {item_id!r} does not exist", code="sealed_item_not_found")
    return item


def own_item(session: Session, grant_id: str, item_id: str) -> SealedItem:
    """Return an item sealed under ``grant_id`` (404 for any other grant's: they are private to it)."""
    item = session.get(SealedItem, item_id)
    if item is None or item.grant_id != grant_id:
        raise NotFoundError(f"sealed item {item_id!r} does not exist", code="sealed_item_not_found")
    return item


def items_of_grant(session: Session, grant_id: str) -> list[SealedItem]:
    """Return a grant's sealed items, oldest first."""
    return list_items(session, grant_id=grant_id)


def list_items(session: Session, *, grant_id: str | None = None, limit: int = 1000) -> list[SealedItem]:
    """Return sealed items (of one grant, or all), oldest first."""
    stmt = select(SealedItem)
    if grant_id is not None:
        stmt = stmt.where(SealedItem.grant_id == grant_id)
    return list(session.scalars(stmt.order_by(SealedItem.created_at, SealedItem.id).limit(limit)))


def ciphertext(item: SealedItem, home: Path | None = None) -> bytes:
    """Return an item's stored sealed box (409 ``sealed_item_missing`` if the store lost it)."""
    try:
        data = _ciphertext_path(home, item.id).read_bytes()
    except FileNotFoundError:
        raise ConflictError(
            f"sealed item {item.id}'s ciphertext is missing from the artifact store", code="sealed_item_missing"
        ) from None
    if hashlib.sha256(data).hexdigest() != item.ciphertext_sha256:
        raise ConflictError(f"sealed item {item.id}'s ciphertext does not match its digest", code="sealed_item_corrupt")
    return data


def release(
    session: Session, item: SealedItem, plaintext: bytes, *, released_by: str, home: Path | None = None
) -> None:
    """Store an item's plaintext readable for the lab after checking it against the sealed digest; log the release.

    Wrong content (digest or size) is 400 ``sealed_plaintext_mismatch`` and changes nothing; a second
    release is 409 ``sealed_item_released``.
    """
    if item.released_at is not None:
        raise ConflictError(f"sealed item {item.id} was already released", code="sealed_item_released")
    if len(plaintext) != item.size or hashlib.sha256(plaintext).hexdigest() != item.plaintext_sha256:
        raise InvalidRequestError(
            f"the content does not match sealed item {item.id} (its SHA-256 and size were recorded when it was sealed)",
            code="sealed_plaintext_mismatch",
            param="content_base64",
        )
    path = _released_path(home, item.id)
    write_atomically(path, plaintext)
    _undo_on_rollback(session, lambda: path.unlink(missing_ok=True))
    item.released_at = utcnow()
    item.released_by = released_by[:200]
    session.flush()
    body = {
        "item": item.id,
        "grant": item.grant_id,
        "capability": item.capability,
        "kind": item.kind,
        "ref": item.ref,
        "sha256": item.plaintext_sha256,
        "size": item.size,
        "released_by": item.released_by,
    }
    ledger.record_event(session, "sealed.released", body)


def released_content(item: SealedItem, home: Path | None = None) -> bytes:
    """Return a released item's plaintext (409 ``sealed_item_not_released`` while it is still sealed)."""
    if item.released_at is None:
        raise ConflictError(
            f"sealed item {item.id} has not been released by its evaluator; the lab cannot read it",
            code="sealed_item_not_released",
        )
    try:
        return _released_path(home, item.id).read_bytes()
    except FileNotFoundError:
        raise ConflictError(
            f"released item {item.id}'s content is missing from the artifact store", code="sealed_item_missing"
        ) from None
