"""Ledger service: record events in the caller's transaction; sequence them into the Merkle log.

Writers only insert a pending row (:func:`record_event`). A sequencer, like Trillian's, later
integrates pending rows in batches: it locks the single ``ledger_state`` row, assigns indices,
hashes leaves, stores the new complete-subtree nodes and the new root, and deletes the pending
rows, all in one transaction, so a crash leaves every event either integrated or still pending.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import logging
import secrets
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import Table, bindparam, delete, func, insert, select, update
from sqlalchemy.orm import Session

from airlock.canonical import canonical_bytes, legacy_bytes
from airlock.db import Database, new_id, utcnow
from airlock.errors import AirlockError, ConflictError, InvalidRequestError, NotFoundError
from airlock.jobs.periodic import PeriodicWorker
from airlock.ledger._entry import ENTRY_VERSION, canonical, commitment_of, iso_utc, parse_entry
from airlock.ledger._merkle import (
    EMPTY_ROOT,
    MemoryTree,
    Node,
    ProofError,
    consistency_ranges,
    fold,
    inclusion_ranges,
    leaf_hash,
    node_hash,
    range_nodes,
    resolve,
)
from airlock.ledger._note import Checkpoint, NoteError, Signer, load_or_create_key, verify_checkpoint
from airlock.ledger.models import (
    NODE_LEVEL_SHIFT,
    LedgerCheckpoint,
    LedgerCommitment,
    LedgerEntry,
    LedgerNode,
    LedgerPending,
    LedgerState,
    node_key,
)
from airlock.ledger.verify import BUNDLE_FORMAT

if TYPE_CHECKING:
    from sqlalchemy import Table

    from airlock.config import Settings

log = logging.getLogger(__name__)

BATCH_SIZE = 5000
MAX_PAGE = 1000
# Audit rows younger than this are left for the next digest: a row that commits late with a smaller
# id than one already digested would otherwise fall outside every digest.
AUDIT_DIGEST_LAG_S = 5.0
AUDIT_DIGEST_BATCH = 20_000


# ---------------------------------------------------------------- recording

_PENDING = cast("Table", LedgerPending.__table__)
_INSERT_PENDING = insert(_PENDING)
_INSERT_COMMITMENT = insert(cast("Table", LedgerCommitment.__table__))
_NODES = cast("Table", LedgerNode.__table__)
_ENTRIES = cast("Table", LedgerEntry.__table__)
_INSERT_ENTRIES = insert(_ENTRIES)
_INSERT_NODES = insert(_NODES)
_SELECT_NODES = select(_NODES.c.key, _NODES.c.hash).where(_NODES.c.key.in_(bindparam("keys", expanding=True)))
_SELECT_LEAVES = select(_ENTRIES.c.idx, _ENTRIES.c.leaf_hash).where(
    _ENTRIES.c.idx.in_(bindparam("keys", expanding=True))
)


def record_event(
    session: Session, kind: str, body: dict[str, Any], *, confidential: dict[str, Any] | None = None
) -> None:
    """Queue a public ledger event in the caller's transaction (confidential fields become commitments).

    The entry is fixed now (id, kind, UTC time, body, and one salted SHA-256 commitment per
    confidential field) and becomes public once the sequencer integrates it; the salts and values
    stay in ``ledger_commitments`` for a later :func:`reveal`. Nothing is committed here.
    """
    record_events(session, [(kind, body, confidential)])


def record_events(session: Session, events: Sequence[tuple[str, dict[str, Any], dict[str, Any] | None]]) -> list[str]:
    """Queue several events ``(kind, body, confidential)`` with one statement; return their ids."""
    pending: list[dict[str, Any]] = []
    openings: list[dict[str, Any]] = []
    for kind, body, confidential in events:
        if not kind or len(kind) > 40:
            raise ValueError("ledger event kind must be 1-40 characters")
        event_id, now = new_id("lev"), utcnow()
        entry: dict[str, Any] = {"v": ENTRY_VERSION, "id": event_id, "kind": kind, "time": iso_utc(now), "body": body}
        if confidential:
            commitments: dict[str, str] = {}
            for field, value in sorted(confidential.items()):
                salt = secrets.token_hex(32)
                value_json = canonical(value)
                digest = commitments[field] = commitment_of(salt, value_json)
                openings.append(
                    {"event_id": event_id, "field": field, "salt": salt, "value": value_json, "commitment": digest}
                )
            entry["commitments"] = commitments
        pending.append({"event_id": event_id, "kind": kind, "entry": canonical(entry), "created_at": now})
    if openings:
        session.execute(_INSERT_COMMITMENT, openings)
    # Only row inserts on the request path (prepared Core statements, no unit-of-work
    # bookkeeping): hashing and tree updates happen in the sequencer.
    if pending:
        session.execute(_INSERT_PENDING, pending)
    return [p["event_id"] for p in pending]


# ---------------------------------------------------------------- sequencing


def _lock_state(session: Session) -> LedgerState:
    """Lock the sequencer row for this transaction and return it.

    The first statement is a write: SQLite then takes its write lock at once (BEGIN IMMEDIATE
    semantics, waiting on busy_timeout) instead of failing to upgrade a stale read snapshot, and
    PostgreSQL row-locks it, so sequencers in several processes or replicas take turns.
    """
    session.execute(update(LedgerState).where(LedgerState.id == 1).values(updated_at=utcnow()))
    locked = select(LedgerState).where(LedgerState.id == 1).with_for_update()
    state = session.scalar(locked.execution_options(populate_existing=True))
    if state is None:
        raise ConflictError("the ledger_state row is missing; run the migrations")
    return state


def _fetch_nodes(session: Session, wanted: Iterable[Node]) -> dict[Node, bytes]:
    """Read stored nodes in at most two queries (level 0 lives in ``ledger_entries``)."""
    leaves = [i for level, i in wanted if level == 0]
    inner = [node_key(level, i) for level, i in wanted if level > 0]
    found: dict[Node, bytes] = {}
    # Expanding IN parameters keep both statements in the compiled-statement cache.
    if leaves:
        for idx, h in session.execute(_SELECT_LEAVES, {"keys": leaves}):
            found[(0, idx)] = h
    if inner:
        for key, h in session.execute(_SELECT_NODES, {"keys": inner}):
            found[(key >> NODE_LEVEL_SHIFT, key & ((1 << NODE_LEVEL_SHIFT) - 1))] = h
    return found


def _resolve(session: Session, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
    """Hash leaf ranges from stored nodes; missing nodes mean the storage was damaged or edited."""
    try:
        return resolve(ranges, lambda wanted: _fetch_nodes(session, wanted))
    except ProofError as exc:
        raise AirlockError(f"ledger storage is inconsistent ({exc}); run `airlock ledger check`") from None


def integrate(session: Session, limit: int = BATCH_SIZE) -> int:
    """Integrate up to ``limit`` pending events in the caller's transaction; return how many."""
    state = _lock_state(session)
    pending = session.execute(
        select(LedgerPending.seq, LedgerPending.event_id, LedgerPending.kind, LedgerPending.entry)
        .order_by(LedgerPending.seq)
        .limit(limit)
    ).all()
    if not pending:
        return 0
    size = state.size
    cache = _fetch_nodes(session, range_nodes(0, size))
    now = utcnow()
    entries: list[dict[str, Any]] = []
    nodes: list[dict[str, Any]] = []
    for offset, (_seq, event_id, kind, entry) in enumerate(pending):
        index = size + offset
        h = leaf_hash(entry.encode())
        entries.append(
            {"idx": index, "event_id": event_id, "kind": kind, "entry": entry, "leaf_hash": h, "integrated_at": now}
        )
        cache[(0, index)] = h
        level, i = 0, index
        # A right child completes its parent: climb while this node is a right child.
        while i & 1:
            h = node_hash(cache[(level, i - 1)], h)
            level, i = level + 1, i >> 1
            cache[(level, i)] = h
            nodes.append({"key": node_key(level, i), "hash": h})
    new_size = size + len(pending)
    # Core executemany: the ORM's bulk path costs more than hashing at these batch sizes.
    session.execute(_INSERT_ENTRIES, entries)
    if nodes:
        session.execute(_INSERT_NODES, nodes)
    # Delete exactly the rows integrated, never a seq range: on PostgreSQL a row with a smaller seq
    # can commit after this batch was read, and it must stay pending.
    seqs = [row.seq for row in pending]
    for start in range(0, len(seqs), 1000):
        session.execute(delete(_PENDING).where(_PENDING.c.seq.in_(seqs[start : start + 1000])))
    state.size = new_size
    state.root_hash = fold([cache[n] for n in range_nodes(0, new_size)])
    session.flush()
    return len(pending)


def sequence(db: Database, *, batch_size: int = BATCH_SIZE) -> int:
    """Integrate every pending event, one transaction per batch; return how many were integrated."""
    total = 0
    with db.session() as session:
        # A read first: an idle sequencer must not take the write lock every interval.
        if session.scalar(select(LedgerPending.seq).limit(1)) is None:
            return 0
    while True:
        with db.session() as session:
            done = integrate(session, batch_size)
        total += done
        if done < batch_size:
            return total


def pending_count(session: Session) -> int:
    """Return how many recorded events await integration."""
    return int(session.scalar(select(func.count()).select_from(LedgerPending)) or 0)


# ---------------------------------------------------------------- reading and proofs


@dataclass(frozen=True)
class TreeHead:
    """The integrated tree: size and root hash."""

    size: int
    root: bytes


def tree_head(session: Session) -> TreeHead:
    """Return the current integrated tree size and root."""
    state = session.get(LedgerState, 1)
    if state is None:
        return TreeHead(0, EMPTY_ROOT)
    return TreeHead(state.size, state.root_hash)


def _check_size(session: Session, size: int, what: str = "size") -> None:
    current = tree_head(session).size
    if not 0 <= size <= current:
        raise InvalidRequestError(f"{what} {size} is outside the tree (size {current})", param=what)


def root_at(session: Session, size: int) -> bytes:
    """Return the root hash of the tree's first ``size`` entries, from stored nodes."""
    _check_size(session, size)
    return _resolve(session, [(0, size)])[0] if size else EMPTY_ROOT


@dataclass(frozen=True)
class InclusionProof:
    """An RFC 9162 inclusion proof with the leaf hash and root it leads to."""

    index: int
    size: int
    leaf_hash: bytes
    proof: list[bytes]
    root: bytes


def inclusion_proof(session: Session, index: int, size: int) -> InclusionProof:
    """Return the proof that entry ``index`` is in the tree of ``size`` (O(log n) nodes, two queries)."""
    _check_size(session, size)
    if not 0 <= index < size:
        raise InvalidRequestError(f"index {index} must be below size {size}", param="index")
    ranges = [*inclusion_ranges(index, size), (index, index + 1), (0, size)]
    *proof, leaf, root = _resolve(session, ranges)
    return InclusionProof(index, size, leaf, proof, root)


def consistency_proof(session: Session, old: int, new: int) -> list[bytes]:
    """Return the RFC 9162 proof that the tree of size ``old`` is a prefix of the tree of size ``new``."""
    _check_size(session, new, "new")
    if not 0 < old <= new:
        raise InvalidRequestError(f"old must satisfy 0 < old <= new (old {old}, new {new})", param="old")
    return _resolve(session, consistency_ranges(old, new))


def get_entries(session: Session, start: int, end: int) -> list[LedgerEntry]:
    """Return integrated entries ``[start, end)`` (at most ``MAX_PAGE``; ``end`` is clamped to the size)."""
    size = tree_head(session).size
    if start < 0 or end <= start:
        raise InvalidRequestError("entries need 0 <= start < end", param="start")
    if start >= size:
        raise InvalidRequestError(f"start {start} is beyond the tree (size {size})", param="start")
    end = min(end, size, start + MAX_PAGE)
    stmt = select(LedgerEntry).where(LedgerEntry.idx >= start, LedgerEntry.idx < end).order_by(LedgerEntry.idx)
    return list(session.scalars(stmt))


# ---------------------------------------------------------------- checkpoints


def get_signer(settings: Settings) -> Signer:
    """Return the lab's ledger signer, creating its key in the data dir on first use."""
    return Signer(settings.ledger_origin, load_or_create_key(settings.ledger_key_path))


def latest_checkpoint(session: Session) -> LedgerCheckpoint | None:
    """Return the newest signed checkpoint, if any."""
    return session.scalar(select(LedgerCheckpoint).order_by(LedgerCheckpoint.id.desc()).limit(1))


def publish_checkpoint(db: Database, signer: Signer, *, force: bool = False) -> LedgerCheckpoint:
    """Integrate pending events and sign a checkpoint of the tree (unless the newest one is current)."""
    sequence(db)
    with db.session() as session:
        state = _lock_state(session)
        last = latest_checkpoint(session)
        if last is not None and last.size == state.size and last.root_hash == state.root_hash and not force:
            return last
        note = signer.sign(Checkpoint(signer.name, state.size, state.root_hash).body())
        row = LedgerCheckpoint(size=state.size, root_hash=state.root_hash, note=note)
        session.add(row)
        session.flush()
        return row


# ---------------------------------------------------------------- audit digests


AUDIT_ENCODING = "rfc8785"
"""How a digest encodes each row; digests without the field used the legacy sorted JSON."""


@dataclass(frozen=True)
class DigestedTable:
    """An append-only table whose rows the ledger digests: ordered by ``id``, stamped by ``ts``.

    The table's owner (access, for the audit trail) describes it; the ledger knows no domain table.
    """

    table: Table
    columns: tuple[str, ...]


def audit_rows_hash(rows: Iterable[Any], columns: Sequence[str], *, encoding: str = AUDIT_ENCODING) -> tuple[str, int]:
    """Return the SHA-256 over the canonical JSON lines of rows (``columns`` only), and the row count."""
    encode = canonical_bytes if encoding == AUDIT_ENCODING else legacy_bytes
    digest, count = hashlib.sha256(), 0
    for row in rows:
        values = row._mapping
        digest.update(encode({name: values[name] for name in columns}) + b"\n")
        count += 1
    return digest.hexdigest(), count


def digest_audit(db: Database, audit: DigestedTable, *, lag_s: float = AUDIT_DIGEST_LAG_S) -> int:
    """Record ``audit.digest`` events covering rows of ``audit`` not yet digested; return how many digests."""
    table = audit.table
    made = 0
    cutoff = utcnow() - timedelta(seconds=lag_s)
    while True:
        with db.session() as session:
            state = _lock_state(session)
            rows = list(
                session.execute(
                    select(table).where(table.c.id > state.audit_last_id).order_by(table.c.id).limit(AUDIT_DIGEST_BATCH)
                )
            )
            # Stop at the first row younger than the lag so the digested id range stays contiguous.
            young = next((i for i, r in enumerate(rows) if r.ts > cutoff), len(rows))
            rows = rows[:young]
            if not rows:
                return made
            sha, count = audit_rows_hash(rows, audit.columns)
            body = {
                "table": table.name,
                "first_id": rows[0].id,
                "last_id": rows[-1].id,
                "after_id": state.audit_last_id,
                "count": count,
                "first_ts": rows[0].ts,
                "last_ts": rows[-1].ts,
                "columns": list(audit.columns),
                "encoding": AUDIT_ENCODING,
                "sha256": sha,
            }
            record_event(session, "audit.digest", body)
            state.audit_last_id = rows[-1].id
            made += 1
        if young < AUDIT_DIGEST_BATCH:
            return made


# ---------------------------------------------------------------- commitments


@dataclass(frozen=True)
class Opening:
    """The salt and value behind one published commitment."""

    event_id: str
    field: str
    salt: str
    value: Any
    commitment: str


def reveal(
    session: Session, event_id: str, fields: Sequence[str] | None = None, *, publish: bool = True
) -> list[Opening]:
    """Return the openings of an event's commitments; with ``publish``, log them as ``commitment.revealed``."""
    import json

    stmt = select(LedgerCommitment).where(LedgerCommitment.event_id == event_id).order_by(LedgerCommitment.field)
    rows = [r for r in session.scalars(stmt) if fields is None or r.field in fields]
    if not rows:
        raise NotFoundError(f"ledger event {event_id!r} has no commitment {list(fields) if fields else ''}".rstrip())
    openings = [Opening(r.event_id, r.field, r.salt, json.loads(r.value), r.commitment) for r in rows]
    if publish:
        now = utcnow()
        for r in rows:
            r.revealed_at = now
        record_event(
            session,
            "commitment.revealed",
            {
                "event": event_id,
                "openings": [{"field": o.field, "salt": o.salt, "value": o.value} for o in openings],
            },
        )
    return openings


# ---------------------------------------------------------------- export and lab-side checks


def export_bundle(db: Database, signer: Signer) -> dict[str, Any]:
    """Return a self-contained bundle: public key, every checkpoint, the entries they cover, proofs."""
    publish_checkpoint(db, signer)
    with db.session() as session:
        checkpoints = list(session.scalars(select(LedgerCheckpoint).order_by(LedgerCheckpoint.id)))
        size = max((c.size for c in checkpoints), default=0)
        entries = list(
            session.scalars(select(LedgerEntry.entry).where(LedgerEntry.idx < size).order_by(LedgerEntry.idx))
        )
        sizes = sorted({c.size for c in checkpoints if c.size > 0})
        consistency = [
            {"old": a, "new": b, "proof": [_b64(h) for h in consistency_proof(session, a, b)]}
            for a, b in itertools.pairwise(sizes)
        ]
    return {
        "format": BUNDLE_FORMAT,
        "origin": signer.name,
        "public_key": signer.verifier.vkey(),
        "exported_at": iso_utc(utcnow()),
        "checkpoints": [c.note for c in checkpoints],
        "consistency": consistency,
        "entries": entries,
    }


def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode()


def _iter_entries(session: Session, chunk: int = 10_000) -> Iterator[LedgerEntry]:
    last = -1
    while True:
        rows = list(
            session.scalars(select(LedgerEntry).where(LedgerEntry.idx > last).order_by(LedgerEntry.idx).limit(chunk))
        )
        yield from rows
        if len(rows) < chunk:
            return
        last = rows[-1].idx
        session.expunge_all()


@dataclass(frozen=True)
class LoggedEvent:
    """A recorded event read back for reconciliation: its parsed entry and the openings the lab keeps."""

    event_id: str
    kind: str
    body: dict[str, Any]
    commitments: dict[str, str]
    openings: dict[str, tuple[str, str]]
    """Field → (salt hex, canonical JSON of the value), as kept in ``ledger_commitments``."""
    integrated: bool
    time: str = ""
    """When the event was recorded (UTC ISO-8601)."""


def logged_events(session: Session, kinds: Sequence[str]) -> list[LoggedEvent]:
    """Return every recorded event of ``kinds``, integrated or still pending, with its kept openings.

    For services that reconcile their rows with what they logged; an entry that does not parse is
    left out here (``check_database`` reports it).
    """
    # Pending first: an event only ever moves from pending to integrated, so a sequencer committing
    # between the two reads (each its own snapshot under PostgreSQL's READ COMMITTED) shows it twice,
    # never zero times; the integrated copy wins.
    pending: dict[str, str] = {
        event_id: entry
        for event_id, entry in session.execute(
            select(LedgerPending.event_id, LedgerPending.entry)
            .where(LedgerPending.kind.in_(kinds))
            .order_by(LedgerPending.seq)
        )
    }
    integrated: dict[str, str] = {
        event_id: entry
        for event_id, entry in session.execute(
            select(LedgerEntry.event_id, LedgerEntry.entry).where(LedgerEntry.kind.in_(kinds)).order_by(LedgerEntry.idx)
        )
    }
    rows = [(event_id, entry, True) for event_id, entry in integrated.items()]
    rows += [(event_id, entry, False) for event_id, entry in pending.items() if event_id not in integrated]
    openings: dict[str, dict[str, tuple[str, str]]] = {}
    ids = [event_id for event_id, _entry, _integrated in rows]
    for start in range(0, len(ids), 1000):
        stmt = select(LedgerCommitment).where(LedgerCommitment.event_id.in_(ids[start : start + 1000]))
        for c in session.scalars(stmt):
            openings.setdefault(c.event_id, {})[c.field] = (c.salt, c.value)
    events: list[LoggedEvent] = []
    for event_id, text, in_tree in rows:
        try:
            data = parse_entry(text)
        except ValueError:
            continue
        body, commitments = data.get("body"), data.get("commitments") or {}
        if not isinstance(body, dict) or not isinstance(commitments, dict):
            continue
        events.append(
            LoggedEvent(
                event_id,
                str(data["kind"]),
                body,
                commitments,
                openings.get(event_id, {}),
                in_tree,
                str(data.get("time", "")),
            )
        )
    return events


def check_database(db: Database, signer: Signer, *, audit: DigestedTable | None = None) -> list[str]:
    """Recompute the whole log from the stored entries and return every inconsistency found.

    Lab-side tamper check: entry text vs leaf hash, contiguous indices, every stored node, the
    state root, every checkpoint's signature and root, commitments, and (with ``audit``) every
    audit digest against the rows of that table it covers.
    """
    problems: list[str] = []
    tree = MemoryTree()
    digests: list[dict[str, Any]] = []
    commitments: dict[str, dict[str, str]] = {}
    with db.session() as session:
        for row in _iter_entries(session):
            if row.idx != len(tree):
                problems.append(f"entry index {row.idx} found where {len(tree)} was expected")
            h = leaf_hash(row.entry.encode())
            if h != row.leaf_hash:
                problems.append(f"entry {row.idx}: stored leaf hash does not match the entry text")
            try:
                data = parse_entry(row.entry)
            except ValueError as exc:
                problems.append(f"entry {row.idx}: {exc}")
                data = {}
            if data and (data["id"] != row.event_id or data["kind"] != row.kind):
                problems.append(f"entry {row.idx}: id/kind columns differ from the entry text")
            if data.get("kind") == "audit.digest":
                digests.append({**data["body"], "_idx": row.idx})
            if data.get("commitments"):
                commitments[data["id"]] = data["commitments"]
            tree.append(h)
        size = len(tree)
        for node in session.scalars(select(LedgerNode)):
            expected = tree.nodes([(node.level, node.idx)]).get((node.level, node.idx))
            if expected != node.hash:
                problems.append(f"tree node (level {node.level}, index {node.idx}) does not match the entries")
        stored_nodes = session.scalar(select(func.count()).select_from(LedgerNode)) or 0
        wanted_nodes = sum(len(level) for level in tree.levels[1:])
        if stored_nodes != wanted_nodes:
            problems.append(f"{stored_nodes} tree nodes are stored where {wanted_nodes} were expected")
        head = tree_head(session)
        if head.size != size or head.root != tree.root():
            problems.append("the ledger state (size/root) does not match the entries")
        for cp in session.scalars(select(LedgerCheckpoint).order_by(LedgerCheckpoint.id)):
            try:
                parsed = verify_checkpoint(cp.note, signer.verifier, signer.name)
            except NoteError as exc:
                problems.append(f"checkpoint {cp.id}: {exc}")
                continue
            if parsed.size != cp.size or parsed.root != cp.root_hash:
                problems.append(f"checkpoint {cp.id}: size/root columns differ from the signed note")
            if parsed.size > size or tree.root(parsed.size) != parsed.root:
                problems.append(f"checkpoint {cp.id}: signed root does not match the entries at size {parsed.size}")
        for c in session.scalars(select(LedgerCommitment)):
            published = commitments.get(c.event_id, {}).get(c.field)
            if published is not None and commitment_of(c.salt, c.value) != published:
                problems.append(f"commitment {c.event_id}/{c.field}: the kept opening does not match the entry")
        if audit is not None:
            covered_to = 0
            table = audit.table
            for d in digests:
                stmt = select(table).where(table.c.id > d["after_id"], table.c.id <= d["last_id"]).order_by(table.c.id)
                # The digest names its columns, so a later schema change does not break old digests.
                sha, count = audit_rows_hash(session.execute(stmt), d["columns"], encoding=d.get("encoding", "legacy"))
                if (sha, count) != (d["sha256"], d["count"]):
                    problems.append(
                        f"audit rows {d['first_id']}..{d['last_id']} differ from their digest (entry {d['_idx']})"
                    )
                covered_to = max(covered_to, d["last_id"])
            state = session.get(LedgerState, 1)
            if state is not None and state.audit_last_id < covered_to:
                problems.append("the ledger state's audit position is behind the logged digests")
    return problems


# ---------------------------------------------------------------- background sequencer


class LedgerSequencer(PeriodicWorker):
    """Background thread: integrate pending events often; digest the audit table and sign checkpoints periodically."""

    name = "ledger-sequencer"

    def __init__(self, db: Database, settings: Settings, audit: DigestedTable) -> None:
        super().__init__(settings.ledger_sequence_interval_s)
        self.db = db
        self.settings = settings
        self.audit = audit
        self._next_checkpoint = time.monotonic() + settings.ledger_checkpoint_interval_s

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread after one last integration pass."""
        super().stop(timeout)
        try:
            sequence(self.db)
        except Exception:
            log.exception("final ledger sequencing failed")

    def tick(self, *, checkpoint: bool) -> None:
        """Run one pass: sequence, and when due digest the audit table and sign a checkpoint."""
        sequence(self.db)
        if checkpoint:
            digest_audit(self.db, self.audit)
            publish_checkpoint(self.db, get_signer(self.settings))

    def run_once(self) -> None:
        """Sequence; digest and sign when the checkpoint interval has passed (even if that pass fails)."""
        due = time.monotonic() >= self._next_checkpoint
        if due:
            self._next_checkpoint = time.monotonic() + self.settings.ledger_checkpoint_interval_s
        self.tick(checkpoint=due)
