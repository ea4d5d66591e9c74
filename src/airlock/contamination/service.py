"""Contamination firewall logic: registering fingerprints, opening and completing checks, what each side may see.

An evaluator's registration belongs to its organisation (every key of its grants sees it); the
lab receives fingerprints only by opening a check, which the ledger records before any hash
leaves the database, and reports back per item how many documents matched. The evaluator then
sees which of its items were found; the lab never sees the items.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from airlock.access.service import Principal
from airlock.canonical import sha256_hex
from airlock.contamination import events
from airlock.contamination.matcher import Match
from airlock.contamination.models import ContaminationCheck, ContaminationHit, ContaminationRegistration
from airlock.contamination.scheme import Fingerprint, FingerprintedItem, Scheme
from airlock.db import utcnow
from airlock.errors import ConflictError, InvalidRequestError, NotFoundError, PermissionDeniedError

__all__ = [
    "MAX_ITEMS",
    "Actor",
    "CheckResult",
    "ItemHit",
    "all_registrations",
    "complete_check",
    "fingerprint_of",
    "get_check",
    "hits_by_registration",
    "list_checks",
    "open_check",
    "own_registration",
    "register",
    "registrations_of",
    "summarize",
    "withdraw",
]

MAX_ITEMS = 200_000
"""Most items one registration may hold (split a larger test set over several)."""


@dataclass(frozen=True)
class Actor:
    """Who runs a check: a lab token (name, role, id) or the operator's CLI."""

    name: str
    role: str
    token_id: str | None = None


@dataclass(frozen=True)
class ItemHit:
    """One registered item found by a check: in how many documents, and the best matched fraction."""

    registration: str
    item: str
    documents: int
    max_fraction: float


@dataclass
class CheckResult:
    """What a finished check reports: counts and the items found, never document text."""

    documents: int
    matched_documents: int
    corpus_digest: str
    hits: list[ItemHit] = field(default_factory=list)


def summarize(matches: Iterable[Match], documents: int, corpus_digest: str) -> CheckResult:
    """Fold document-level matches into per-item hits (document ids stay with the lab)."""
    per_item: dict[tuple[str, str], list[float]] = defaultdict(list)
    matched_docs: set[str] = set()
    for m in matches:
        per_item[(m.registration, m.item)].append(m.fraction)
        matched_docs.add(m.document)
    hits = [ItemHit(reg, item, len(fr), max(fr)) for (reg, item), fr in sorted(per_item.items())]
    return CheckResult(documents, len(matched_docs), corpus_digest, hits)


# ---------------------------------------------------------------- evaluator side


def register(session: Session, principal: Principal, data: dict[str, object]) -> ContaminationRegistration:
    """Store a fingerprint uploaded by an evaluator key under its organisation; 400 if malformed."""
    try:
        fp = Fingerprint.from_json(data)
    except ValueError as exc:
        raise InvalidRequestError(str(exc), code="invalid_fingerprint") from None
    if len(fp.items) > MAX_ITEMS:
        raise InvalidRequestError(
            f"{len(fp.items)} items; one registration holds at most {MAX_ITEMS} (split the test set)",
            code="invalid_fingerprint",
        )
    sizes = np.array([item.shingles.size for item in fp.items], dtype="<u4")
    row = ContaminationRegistration(
        evaluator_id=principal.evaluator_id,
        grant_id=principal.grant_id,
        key_id=principal.key_id,
        name=fp.name[:200],
        salt=fp.salt.hex(),
        ngram=fp.scheme.ngram,
        threshold=fp.scheme.threshold,
        min_shingles=fp.scheme.min_shingles,
        item_count=len(fp.items),
        shingle_count=int(sizes.sum()),
        skipped=fp.skipped,
        digest=sha256_hex(fp.to_json()),
        item_ids=[item.id for item in fp.items],
        sizes=sizes.tobytes(),
        hashes=np.concatenate([item.shingles for item in fp.items]).astype("<u4").tobytes(),
    )
    session.add(row)
    session.flush()
    events.registered(session, row)
    return row


def registrations_of(session: Session, evaluator_id: str) -> list[ContaminationRegistration]:
    """Return an organisation's registrations, newest first."""
    return list(
        session.scalars(
            select(ContaminationRegistration)
            .where(ContaminationRegistration.evaluator_id == evaluator_id)
            .order_by(ContaminationRegistration.created_at.desc(), ContaminationRegistration.id)
        )
    )


def all_registrations(session: Session) -> list[ContaminationRegistration]:
    """Return every organisation's registrations, newest first (the lab's overview)."""
    return list(
        session.scalars(
            select(ContaminationRegistration).order_by(
                ContaminationRegistration.created_at.desc(), ContaminationRegistration.id
            )
        )
    )


def own_registration(session: Session, principal: Principal, registration_id: str) -> ContaminationRegistration:
    """Return one of the caller organisation's registrations (404 for anyone else's)."""
    row = session.get(ContaminationRegistration, registration_id)
    if row is None or row.evaluator_id != principal.evaluator_id:
        raise NotFoundError(f"registration {registration_id!r} does not exist", code="registration_not_found")
    return row


def withdraw(session: Session, principal: Principal, registration_id: str) -> ContaminationRegistration:
    """Take a registration out of future checks (409 if already withdrawn)."""
    row = own_registration(session, principal, registration_id)
    if row.status != "active":
        raise ConflictError(f"registration {row.id} is already withdrawn", code="registration_withdrawn")
    row.status, row.withdrawn_at = "withdrawn", utcnow()
    events.withdrawn(session, row)
    return row


def hits_by_registration(session: Session, registration_ids: Sequence[str]) -> dict[str, list[ItemHit]]:
    """Return, per registration, every item completed checks found (documents summed, best fraction)."""
    if not registration_ids:
        return {}
    rows = session.scalars(select(ContaminationHit).where(ContaminationHit.registration_id.in_(registration_ids)))
    merged: dict[tuple[str, str], tuple[int, float]] = {}
    for hit in rows:
        docs, best = merged.get((hit.registration_id, hit.item_id), (0, 0.0))
        merged[(hit.registration_id, hit.item_id)] = (docs + hit.documents, max(best, hit.max_fraction))
    out: dict[str, list[ItemHit]] = defaultdict(list)
    for (reg, item), (docs, best) in sorted(merged.items()):
        out[reg].append(ItemHit(reg, item, docs, best))
    return dict(out)


# ---------------------------------------------------------------- lab side


def fingerprint_of(row: ContaminationRegistration) -> Fingerprint:
    """Rebuild a registration's fingerprint from its stored arrays."""
    sizes = np.frombuffer(row.sizes, dtype="<u4").astype(np.int64)
    hashes = np.frombuffer(row.hashes, dtype="<u4").astype(np.uint32)
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    items = [FingerprintedItem(item_id, hashes[bounds[i] : bounds[i + 1]]) for i, item_id in enumerate(row.item_ids)]
    scheme = Scheme(row.ngram, row.threshold, row.min_shingles)
    return Fingerprint(row.name, bytes.fromhex(row.salt), scheme, items, row.skipped)


def open_check(
    session: Session, actor: Actor, corpus: str = ""
) -> tuple[ContaminationCheck, list[tuple[str, Fingerprint]]]:
    """Open a check over every active registration and return their fingerprints (the ledger records it first)."""
    regs = list(
        session.scalars(
            select(ContaminationRegistration)
            .where(ContaminationRegistration.status == "active")
            .order_by(ContaminationRegistration.created_at, ContaminationRegistration.id)
        )
    )
    row = ContaminationCheck(
        actor=actor.name[:200],
        role=actor.role,
        token_id=actor.token_id,
        corpus=corpus[:200],
        registrations=[r.id for r in regs],
    )
    session.add(row)
    session.flush()
    events.check_opened(session, row)
    return row, [(r.id, fingerprint_of(r)) for r in regs]


def get_check(session: Session, check_id: str) -> ContaminationCheck:
    """Return one check (404 if unknown)."""
    row = session.get(ContaminationCheck, check_id)
    if row is None:
        raise NotFoundError(f"check {check_id!r} does not exist", code="check_not_found")
    return row


def list_checks(session: Session) -> list[ContaminationCheck]:
    """Return every check, newest first."""
    return list(
        session.scalars(
            select(ContaminationCheck).order_by(ContaminationCheck.created_at.desc(), ContaminationCheck.id)
        )
    )


def complete_check(session: Session, check_id: str, actor: Actor, result: CheckResult) -> ContaminationCheck:
    """Record a check's outcome once; only whoever opened it may (403), and only items it was given (400)."""
    row = get_check(session, check_id)
    if row.token_id != actor.token_id:
        raise PermissionDeniedError(
            f"check {row.id} was opened by {row.actor!r}; only that token may report its result",
            code="check_not_yours",
        )
    if row.status != "open":
        raise ConflictError(f"check {row.id} already has a result", code="check_completed")
    if result.documents < 0 or not 0 <= result.matched_documents <= result.documents:
        raise InvalidRequestError("matched_documents must be between 0 and documents", code="invalid_result")
    known: dict[str, set[str]] = {}
    for rid in row.registrations:
        reg = session.get(ContaminationRegistration, rid)
        known[rid] = set(reg.item_ids) if reg is not None else set()
    hits: list[ContaminationHit] = []
    seen: set[tuple[str, str]] = set()
    for hit in result.hits:
        if hit.item not in known.get(hit.registration, set()):
            raise InvalidRequestError(
                f"item {hit.item!r} is not in registration {hit.registration!r} of this check", code="invalid_result"
            )
        if (hit.registration, hit.item) in seen or hit.documents < 1 or not 0 < hit.max_fraction <= 1:
            raise InvalidRequestError(
                f"item {hit.item!r}: one entry per item, documents >= 1, 0 < max_fraction <= 1", code="invalid_result"
            )
        seen.add((hit.registration, hit.item))
        hits.append(
            ContaminationHit(
                check_id=row.id,
                registration_id=hit.registration,
                item_id=hit.item,
                documents=hit.documents,
                max_fraction=hit.max_fraction,
            )
        )
    session.add_all(hits)
    row.status, row.completed_at = "completed", utcnow()
    row.documents, row.matched_documents, row.corpus_digest = (
        result.documents,
        result.matched_documents,
        result.corpus_digest,
    )
    events.check_completed(session, row, hits)
    return row
