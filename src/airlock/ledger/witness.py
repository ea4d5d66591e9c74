"""A C2SP tlog-witness: cosigns a log's checkpoints only along one append-only history.

An evaluator organisation or any third party runs it (``airlock witness serve``) with its own
Ed25519 key and its own small SQLite store, configured with the verifier keys of the logs it
witnesses. ``POST /add-checkpoint`` takes ``old <size>``, the consistency proof lines, a blank
line and the signed checkpoint, and answers as c2sp.org/tlog-witness prescribes: 404 unknown
origin, 403 no valid log signature, 400 malformed or rollback (old size above the checkpoint's),
409 with ``text/x.tlog.size`` when the old size is not the witness's, 422 when the proof fails or
a same-size checkpoint has another root, and 200 with a tlog-cosignature/v1 line otherwise. The
check and the update are one ``BEGIN IMMEDIATE`` transaction, so concurrent requests cannot roll
the witness back. Every refused checkpoint that carries a valid log signature is kept as evidence
beside the checkpoint the witness had cosigned: two signed statements anyone can check with
:func:`check_evidence`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Sequence
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from airlock.ledger._cosig import Cosigner, WitnessVerifier, split_note
from airlock.ledger._entry import iso_utc
from airlock.ledger._merkle import EMPTY_ROOT, ProofError, verify_consistency
from airlock.ledger._note import Checkpoint, NoteError, Verifier, open_note

__all__ = [
    "EVIDENCE_FORMAT",
    "MAX_PROOF_LINES",
    "SIZE_CONTENT_TYPE",
    "Witness",
    "WitnessResponse",
    "check_evidence",
    "origin_hash",
    "parse_add_checkpoint",
]

MAX_PROOF_LINES = 63
MAX_REQUEST_BYTES = 64 * 1024
SIZE_CONTENT_TYPE = "text/x.tlog.size"
EVIDENCE_FORMAT = "airlock.witness-evidence/v1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS logs (
    origin TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    root BLOB NOT NULL,
    note TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS refusals (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    origin TEXT NOT NULL,
    at TEXT NOT NULL,
    status INTEGER NOT NULL,
    reason TEXT NOT NULL,
    old_size INTEGER NOT NULL,
    proof TEXT NOT NULL,
    submitted TEXT NOT NULL,
    witnessed TEXT
);
"""


def origin_hash(origin: str) -> str:
    """Return the lower-case hex SHA-256 of a log origin (the monitoring path segment)."""
    return hashlib.sha256(origin.encode()).hexdigest()


@dataclass(frozen=True)
class WitnessResponse:
    """An HTTP answer: status, text body and content type."""

    status: int
    body: str
    content_type: str = "text/plain; charset=utf-8"


@dataclass(frozen=True)
class AddCheckpoint:
    """A parsed add-checkpoint request."""

    old: int
    proof: list[bytes]
    note: str


class RequestError(ValueError):
    """An add-checkpoint request that is not well formed (400)."""


def parse_add_checkpoint(text: str) -> AddCheckpoint:
    """Parse ``old N``, the proof lines, a blank line and the checkpoint note; raise :class:`RequestError`."""
    head, sep, note = text.partition("\n\n")
    if not sep:
        raise RequestError("expected an old size line, proof lines, a blank line and a checkpoint")
    lines = head.split("\n")
    old_line = lines[0]
    size_text = old_line[4:] if old_line.startswith("old ") else ""
    if not size_text.isdigit() or (size_text != "0" and size_text.startswith("0")):
        raise RequestError("the first line must be `old <size>` in decimal without leading zeroes")
    if len(lines) - 1 > MAX_PROOF_LINES:
        raise RequestError(f"at most {MAX_PROOF_LINES} consistency proof lines are allowed")
    proof: list[bytes] = []
    for line in lines[1:]:
        try:
            proof.append(base64.b64decode(line, validate=True))
        except binascii.Error:
            raise RequestError("a consistency proof line is not base64") from None
    return AddCheckpoint(int(size_text), proof, note)


class Witness:
    """The witness's logic and store; the HTTP layer (:func:`create_app`) only moves bytes."""

    def __init__(self, cosigner: Cosigner, logs: Sequence[Verifier], store: Path) -> None:
        self.cosigner = cosigner
        self.logs: dict[str, Verifier] = {}
        for log in logs:
            # The checkpoint's origin line names the log; the lab's key carries the same name.
            self.logs[log.name] = log
        self.store = store
        store.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        with closing(self._connect()) as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)

    @property
    def verifier(self) -> WitnessVerifier:
        """The witness's own verifier key."""
        return self.cosigner.verifier

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.store, isolation_level=None, timeout=30.0)
        # The new checkpoint must be on disk before the cosignature leaves.
        db.execute("PRAGMA synchronous=FULL")
        return db

    def add_checkpoint(self, raw: bytes) -> WitnessResponse:
        """Handle one add-checkpoint request body."""
        if len(raw) > MAX_REQUEST_BYTES:
            return WitnessResponse(400, "request too large\n")
        try:
            request = parse_add_checkpoint(raw.decode("utf-8"))
            body, _lines = split_note(request.note)
            checkpoint = Checkpoint.parse(body)
        except (UnicodeDecodeError, RequestError, NoteError) as exc:
            return WitnessResponse(400, f"{exc}\n")
        log = self.logs.get(checkpoint.origin)
        if log is None:
            return WitnessResponse(404, f"unknown log origin {checkpoint.origin!r}\n")
        try:
            open_note(request.note, log)
        except NoteError as exc:
            return WitnessResponse(403, f"{exc}\n")
        if request.old > checkpoint.size:
            return WitnessResponse(400, f"old size {request.old} exceeds the checkpoint size {checkpoint.size}\n")
        if checkpoint.size == 0 and checkpoint.root != EMPTY_ROOT:
            return WitnessResponse(422, "a checkpoint of size 0 must have the empty tree's root\n")
        with self._lock, closing(self._connect()) as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                response = self._check_and_cosign(db, request, checkpoint, log)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        return response

    def _check_and_cosign(
        self, db: sqlite3.Connection, request: AddCheckpoint, checkpoint: Checkpoint, log: Verifier
    ) -> WitnessResponse:
        row = db.execute("SELECT size, root, note FROM logs WHERE origin = ?", (checkpoint.origin,)).fetchone()
        size, root, witnessed = (int(row[0]), bytes(row[1]), str(row[2])) if row else (0, EMPTY_ROOT, None)
        if request.old != size:
            return WitnessResponse(409, f"{size}\n", SIZE_CONTENT_TYPE)
        problem = self._consistency_problem(request, checkpoint, root)
        if problem is not None:
            db.execute(
                "INSERT INTO refusals (origin, at, status, reason, old_size, proof, submitted, witnessed)"
                " VALUES (?, ?, 422, ?, ?, ?, ?, ?)",
                (
                    checkpoint.origin,
                    _now(),
                    problem,
                    request.old,
                    json.dumps([base64.b64encode(p).decode() for p in request.proof]),
                    request.note,
                    witnessed,
                ),
            )
            return WitnessResponse(422, f"{problem}\n")
        line = self.cosigner.cosign(checkpoint.body())
        kept = _log_signed(request.note, log) + line
        db.execute(
            "INSERT INTO logs (origin, size, root, note, updated_at) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT(origin) DO UPDATE SET size = excluded.size, root = excluded.root,"
            " note = excluded.note, updated_at = excluded.updated_at",
            (checkpoint.origin, checkpoint.size, checkpoint.root, kept, _now()),
        )
        return WitnessResponse(200, line)

    @staticmethod
    def _consistency_problem(request: AddCheckpoint, checkpoint: Checkpoint, root: bytes) -> str | None:
        if request.old == 0:
            return "a proof from the empty tree must be empty" if request.proof else None
        if request.old == checkpoint.size:
            if request.proof:
                return "the sizes are equal but the proof is not empty"
            if checkpoint.root != root:
                return f"a checkpoint of size {checkpoint.size} with another root than the one cosigned (a fork)"
            return None
        try:
            verify_consistency(request.old, checkpoint.size, request.proof, root, checkpoint.root)
        except ProofError as exc:
            return f"not consistent with the cosigned checkpoint of size {request.old}: {exc}"
        return None

    def latest(self, hashed_origin: str) -> WitnessResponse:
        """Return the newest cosigned checkpoint of the log whose origin hashes to ``hashed_origin``."""
        with closing(self._connect()) as db:
            for origin, note in db.execute("SELECT origin, note FROM logs"):
                if origin_hash(origin) == hashed_origin:
                    return WitnessResponse(200, note)
        return WitnessResponse(404, "this witness has cosigned no checkpoint of that log\n")

    def evidence(self) -> list[dict[str, Any]]:
        """Return every refused, log-signed checkpoint beside the one the witness had cosigned."""
        with closing(self._connect()) as db:
            rows = db.execute(
                "SELECT id, origin, at, status, reason, old_size, proof, submitted, witnessed FROM refusals ORDER BY id"
            ).fetchall()
        return [
            {
                "format": EVIDENCE_FORMAT,
                "witness": self.verifier.vkey(),
                "id": r[0],
                "origin": r[1],
                "at": r[2],
                "status": r[3],
                "reason": r[4],
                "old_size": r[5],
                "proof": json.loads(r[6]),
                "submitted": r[7],
                "witnessed": r[8],
            }
            for r in rows
        ]


def _log_signed(note: str, log: Verifier) -> str:
    """Return the note reduced to its body and the log's own signature line(s), ready for ours."""
    body, lines = split_note(note)
    own = [line for line in lines if line[2:].partition(" ")[0] == log.name]
    return body + "\n" + "".join(f"{line}\n" for line in own)


def _now() -> str:
    return iso_utc(datetime.fromtimestamp(time.time(), UTC))


# ---------------------------------------------------------------- evidence, checked by anyone


def check_evidence(record: dict[str, Any], log: Verifier) -> tuple[bool, str]:
    """Check a witness's refusal record against the log's key; return (is it proof of a fork, why).

    Both checkpoints must carry valid log signatures. Two signed checkpoints of one size with
    different roots prove a fork outright. A larger refused checkpoint proves one when the
    consistency proof the log itself sent fails to connect it to the checkpoint the witness had
    cosigned: a log that is append-only can always produce a valid proof between the two.
    """
    try:
        if record.get("format") != EVIDENCE_FORMAT:
            return False, f"unknown evidence format {record.get('format')!r}"
        if not record.get("witnessed"):
            return False, "the witness had cosigned nothing before: a refusal then proves no fork"
        submitted = Checkpoint.parse(open_note(str(record["submitted"]), log))
        witnessed = Checkpoint.parse(open_note(str(record["witnessed"]), log))
        if submitted.origin != witnessed.origin or submitted.origin != log.name:
            return False, "the two checkpoints name different logs"
        if submitted.size == witnessed.size:
            if submitted.root == witnessed.root:
                return False, "the two checkpoints agree"
            return True, (
                f"{log.name} signed two checkpoints of size {submitted.size} with different roots "
                f"({base64.b64encode(witnessed.root).decode()} and {base64.b64encode(submitted.root).decode()})"
            )
        if submitted.size < witnessed.size:
            return False, "the refused checkpoint is older than the one cosigned (a stale request, not a fork)"
        proof = [base64.b64decode(p, validate=True) for p in record.get("proof", [])]
        try:
            verify_consistency(witnessed.size, submitted.size, proof, witnessed.root, submitted.root)
        except ProofError as exc:
            return True, (
                f"{log.name} signed checkpoints of sizes {witnessed.size} and {submitted.size} and could not "
                f"connect them ({exc}); an append-only log can always prove the larger extends the smaller"
            )
        return False, "the consistency proof verifies: the refusal was not about a fork"
    except (NoteError, KeyError, TypeError, ValueError) as exc:
        return False, f"the evidence does not check: {exc}"


# ---------------------------------------------------------------- HTTP


def create_app(witness: Witness) -> Any:
    """Return the witness's ASGI application (add-checkpoint, monitoring checkpoint, evidence)."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    def _reply(r: WitnessResponse) -> Response:
        return Response(r.body, status_code=r.status, media_type=r.content_type)

    async def add_checkpoint(request: Request) -> Response:
        raw = await request.body()
        return _reply(await run_in_threadpool(witness.add_checkpoint, raw))

    async def checkpoint(request: Request) -> Response:
        return _reply(await run_in_threadpool(witness.latest, request.path_params["origin_hash"]))

    async def evidence(request: Request) -> Response:
        return JSONResponse(await run_in_threadpool(witness.evidence))

    async def pubkey(request: Request) -> Response:
        return PlainTextResponse(witness.verifier.vkey() + "\n")

    return Starlette(
        routes=[
            Route("/add-checkpoint", add_checkpoint, methods=["POST"]),
            Route("/evidence", evidence, methods=["GET"]),
            Route("/pubkey", pubkey, methods=["GET"]),
            Route("/{origin_hash:str}/checkpoint", checkpoint, methods=["GET"]),
        ]
    )
