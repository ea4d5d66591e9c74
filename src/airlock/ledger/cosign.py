"""The lab's side of c2sp.org/tlog-witness: ask each configured witness to cosign the newest checkpoint.

Witnesses are asked in parallel, each with its own timeout, and each cosignature is stored (as a
signature line appended to the checkpoint's note) as soon as it arrives: a slow or absent witness
delays no other and no sequencing. A witness that did not answer is asked again on the next pass,
with a consistency proof from the size it last cosigned; a ``409`` answer tells that size.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import httpx
from sqlalchemy import select, update

from airlock.db import Database
from airlock.jobs.periodic import PeriodicWorker
from airlock.ledger._cosig import WitnessVerifier, add_signature_lines, cosignatures, split_note
from airlock.ledger._note import NoteError
from airlock.ledger.models import LedgerCheckpoint
from airlock.ledger.service import consistency_proof, latest_checkpoint
from airlock.ledger.witness import SIZE_CONTENT_TYPE

if TYPE_CHECKING:
    from airlock.config import Settings

__all__ = [
    "CheckpointCosigner",
    "CosignOutcome",
    "Endpoint",
    "cosign_newest",
    "cosigned_by",
    "endpoints_of",
    "request_body",
]

log = logging.getLogger(__name__)

# How many older checkpoints are searched for the size a witness last cosigned.
_HISTORY = 200


@dataclass(frozen=True)
class Endpoint:
    """A configured witness: where to post, and the key its cosignatures must verify under."""

    url: str
    verifier: WitnessVerifier

    @property
    def name(self) -> str:
        """The witness's key name."""
        return self.verifier.name


def endpoints_of(settings: Settings) -> list[Endpoint]:
    """Return the configured witnesses (a malformed key is a configuration error, raised)."""
    return [Endpoint(w.url.rstrip("/"), WitnessVerifier.parse(w.key)) for w in settings.ledger_witnesses]


def cosigned_by(note: str, endpoints: Sequence[Endpoint]) -> list[str]:
    """Return the names of the configured witnesses whose cosignatures on a checkpoint note verify."""
    if not endpoints:
        return []
    valid, _problems = cosignatures(note, [e.verifier for e in endpoints])
    return sorted(c.name for c in valid)


@dataclass
class CosignOutcome:
    """What one pass achieved for the newest checkpoint."""

    size: int = 0
    cosigned: list[str] = field(default_factory=list)
    already: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def witnesses(self) -> int:
        """How many witnesses' cosignatures the checkpoint now carries."""
        return len(self.cosigned) + len(self.already)


def request_body(old: int, proof: Sequence[bytes], note: str) -> bytes:
    """Return an add-checkpoint request body: ``old N``, proof lines, a blank line, the note."""
    lines = [f"old {old}", *(base64.b64encode(h).decode() for h in proof)]
    return ("\n".join(lines) + "\n\n" + note).encode()


def _last_cosigned_size(db: Database, endpoint: Endpoint, below_id: int) -> int:
    with db.session() as session:
        rows = session.execute(
            select(LedgerCheckpoint.size, LedgerCheckpoint.note)
            .where(LedgerCheckpoint.id < below_id)
            .order_by(LedgerCheckpoint.id.desc())
            .limit(_HISTORY)
        )
        for size, note in rows:
            try:
                valid, _problems = cosignatures(note, [endpoint.verifier])
            except NoteError:
                continue
            if valid:
                return int(size)
    return 0


def _proof(db: Database, old: int, new: int) -> list[bytes]:
    if old == 0 or old == new:
        return []
    with db.session() as session:
        return consistency_proof(session, old, new)


def _ask(
    db: Database,
    client: httpx.Client,
    endpoint: Endpoint,
    size: int,
    note: str,
    old: int,
    proofs: dict[int, list[bytes]],
) -> str:
    """Ask one witness; return its verified cosignature line or raise with why not."""
    body, _ = split_note(note)
    for _attempt in range(2):
        if old > size:
            raise RuntimeError(f"the witness has cosigned size {old}, beyond this checkpoint ({size})")
        proof = proofs[old] if old in proofs else _proof(db, old, size)
        response = client.post(f"{endpoint.url}/add-checkpoint", content=request_body(old, proof, note))
        if response.status_code == 409 and response.headers.get("content-type", "").startswith(SIZE_CONTENT_TYPE):
            text = response.text.strip()
            if not text.isdigit():
                raise RuntimeError("409 without a size")
            old = int(text)  # the witness's own record decides; try once more from there
            continue
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.text.strip()[:200]}")
        for line in response.text.splitlines():
            cosig = endpoint.verifier.check(body, line)
            if cosig is not None:
                return cosig.line
        raise RuntimeError("the answer carries no cosignature by the configured key")
    raise RuntimeError("the witness's size kept changing")


def _store(db: Database, row_id: int, line: str) -> None:
    """Append one cosignature line to the checkpoint's note (read-modify-write under the row's lock)."""
    with db.session() as session:
        # A write first: SQLite takes its write lock now, PostgreSQL the row lock, so two witnesses
        # answering together cannot both read the old note and drop each other's line.
        where = LedgerCheckpoint.id == row_id
        session.execute(update(LedgerCheckpoint).where(where).values(note=LedgerCheckpoint.note))
        stmt = select(LedgerCheckpoint).where(where).with_for_update().execution_options(populate_existing=True)
        row = session.scalar(stmt)
        if row is not None:
            row.note = add_signature_lines(row.note, [line])


def cosign_newest(
    db: Database,
    endpoints: Sequence[Endpoint],
    *,
    client: httpx.Client,
    pool: ThreadPoolExecutor | None = None,
    known: dict[str, int] | None = None,
) -> CosignOutcome:
    """Ask every witness missing from the newest checkpoint to cosign it; store each answer as it comes.

    ``known`` remembers, across passes, the size each witness last cosigned (read from the stored
    cosignatures when absent); a witness's 409 corrects it.
    """
    outcome = CosignOutcome()
    with db.session() as session:
        row = latest_checkpoint(session)
        if row is None or not endpoints:
            return outcome
        row_id, size, note = row.id, row.size, row.note
    outcome.size = size
    present = {c.name for c in cosignatures(note, [e.verifier for e in endpoints])[0]}
    outcome.already = [e.name for e in endpoints if e.name in present]
    missing = [e for e in endpoints if e.name not in present]

    sizes = known if known is not None else {}
    for endpoint in missing:
        if endpoint.name not in sizes:
            sizes[endpoint.name] = _last_cosigned_size(db, endpoint, row_id)
    # One proof per distinct old size, read before the requests go out (usually one for all).
    proofs = {old: _proof(db, old, size) for old in {sizes[e.name] for e in missing} if old <= size}

    def one(endpoint: Endpoint) -> None:
        try:
            line = _ask(db, client, endpoint, size, note, sizes[endpoint.name], proofs)
            _store(db, row_id, line)
            sizes[endpoint.name] = size
            outcome.cosigned.append(endpoint.name)
        except (httpx.HTTPError, RuntimeError, NoteError) as exc:
            outcome.failed[endpoint.name] = str(exc) or type(exc).__name__
            log.warning("witness %s did not cosign checkpoint %d: %s", endpoint.name, size, exc)

    if len(missing) == 1:
        one(missing[0])
    elif missing:
        own = pool is None
        executor = pool or ThreadPoolExecutor(max_workers=len(missing), thread_name_prefix="cosign")
        try:
            list(executor.map(one, missing))
        finally:
            if own:
                executor.shutdown(wait=True)
    return outcome


class CheckpointCosigner(PeriodicWorker):
    """Background thread: get the newest checkpoint cosigned by every configured witness, retrying the absent."""

    name = "ledger-cosigner"

    def __init__(self, db: Database, settings: Settings) -> None:
        super().__init__(settings.ledger_cosign_interval_s)
        self.db = db
        self.endpoints = endpoints_of(settings)
        self.client = httpx.Client(timeout=settings.ledger_witness_timeout_s)
        self.pool = ThreadPoolExecutor(max_workers=max(1, len(self.endpoints)), thread_name_prefix="cosign")
        self.known: dict[str, int] = {}

    def run_once(self) -> CosignOutcome:
        """Ask the witnesses missing from the newest checkpoint."""
        return cosign_newest(self.db, self.endpoints, client=self.client, pool=self.pool, known=self.known)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread and close the connections."""
        super().stop(timeout)
        self.pool.shutdown(wait=False)
        self.client.close()
