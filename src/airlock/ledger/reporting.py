"""Build the Model Report's external-evaluation section from the lab's ledger (database side)."""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from airlock.businessdays import load_calendar
from airlock.db import Database, utcnow
from airlock.errors import ConflictError, NotFoundError
from airlock.ledger._cosig import cosignatures
from airlock.ledger._entry import iso_utc
from airlock.ledger._merkle import MemoryTree
from airlock.ledger.cosign import endpoints_of
from airlock.ledger.model_report import FORMAT, KINDS, derive, is_relevant, parse_cited, years_of
from airlock.ledger.models import LedgerCheckpoint, LedgerEntry
from airlock.ledger.service import get_signer

if TYPE_CHECKING:
    from airlock.config import Settings

__all__ = ["build_model_report"]

_RECENT_CHECKPOINTS = 50


def _checkpoint(db: Database, settings: Settings) -> tuple[LedgerCheckpoint, list[str]]:
    """Return the newest checkpoint with the most cosignatures by the configured witnesses."""
    witnesses = [e.verifier for e in endpoints_of(settings)]
    with db.session() as session:
        rows = list(
            session.scalars(select(LedgerCheckpoint).order_by(LedgerCheckpoint.id.desc()).limit(_RECENT_CHECKPOINTS))
        )
        session.expunge_all()
    if not rows:
        raise ConflictError("the ledger has no checkpoint yet: run `airlock ledger checkpoint`", code="no_checkpoint")
    best, names = rows[0], list[str]()
    for row in rows:
        valid = cosignatures(row.note, witnesses)[0] if witnesses else []
        if len(valid) > len(names):
            best, names = row, sorted(c.name for c in valid)
        if witnesses and len(names) == len(witnesses):
            break
    return best, names


def build_model_report(db: Database, settings: Settings, model: str, version: str) -> dict[str, Any]:
    """Return the verifiable section for ``model@version`` (label or content-hash prefix)."""
    row, witnessed_by = _checkpoint(db, settings)
    size = row.size
    tree = MemoryTree()
    relevant: dict[int, tuple[str, dict[str, Any]]] = {}
    with db.session() as session:
        last = -1
        while True:
            chunk = session.execute(
                select(LedgerEntry.idx, LedgerEntry.kind, LedgerEntry.leaf_hash, LedgerEntry.entry)
                .where(LedgerEntry.idx > last, LedgerEntry.idx < size)
                .order_by(LedgerEntry.idx)
                .limit(20_000)
            ).all()
            for idx, kind, h, text in chunk:
                tree.append(h)
                if kind in KINDS:
                    relevant[idx] = (text, parse_cited(text))
            if len(chunk) < 20_000:
                break
            last = chunk[-1][0]
    version_hash, label = _resolve_version(relevant.values(), model, version)
    cited: dict[int, tuple[str, dict[str, Any]]] = {}
    grants: set[str] = set()
    for idx, (text, entry) in sorted(relevant.items()):
        if is_relevant(entry, model, version_hash, grants):
            cited[idx] = (text, entry)
            if entry["kind"] == "grant.issued":
                grants.add(entry["body"]["grant"])
    calendar = load_calendar(settings.calendar)
    years = years_of([e for _t, e in cited.values()] + [{"time": iso_utc(utcnow())}])
    statements = derive({i: e for i, (_t, e) in cited.items()}, version_hash, calendar, row.root_hash)
    return {
        "format": FORMAT,
        "model": model,
        "version": label,
        "version_hash": version_hash,
        "generated_at": iso_utc(utcnow()),
        "lab_key": get_signer(settings).verifier.vkey(),
        "checkpoint": row.note,
        "witnessed_by": witnessed_by,
        "calendar": {**calendar.describe(years), "years": years},
        "entries": [
            {
                "index": i,
                "entry": text,
                "proof": [base64.b64encode(p).decode() for p in tree.inclusion_proof(i, size)],
            }
            for i, (text, _e) in sorted(cited.items())
        ],
        "statements": statements,
    }


def _resolve_version(entries: Any, model: str, version: str) -> tuple[str, str]:
    """Find the content hash and label of ``model@version`` from the ledger's own entries."""
    for _text, entry in entries:
        body = entry.get("body") or {}
        refs = body.get("versions", []) if entry["kind"] == "grant.issued" else [body.get("version")]
        for ref in refs:
            if not isinstance(ref, dict) or ref.get("model", model) != model:
                continue
            if entry["kind"] == "grant.issued" and body.get("model") != model:
                continue
            if version in (ref.get("label"), ref.get("hash")) or str(ref.get("hash", "")).startswith(version):
                return str(ref["hash"]), str(ref.get("label", version))
    raise NotFoundError(f"the ledger's signed entries say nothing about {model}@{version}")
