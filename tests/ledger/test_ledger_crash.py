"""SIGKILL in the middle of append and sequencing batches loses no committed event and leaves the log consistent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select

from airlock.access.audit import AUDIT_DIGEST
from airlock.db import Database
from airlock.ledger import service
from airlock.ledger._note import Signer
from airlock.ledger.models import LedgerEntry, LedgerPending

CHILD = Path(__file__).with_name("ledger_crash_child.py")
REPO = Path(__file__).resolve().parents[2]


def _run_and_kill(url: str, worker: str, delay: float) -> list[str]:
    """Start the child, let it commit a few batches, SIGKILL it ``delay`` s later; return committed ids."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen(
        [sys.executable, str(CHILD), url, worker], stdout=subprocess.PIPE, text=True, env=env, cwd=REPO
    )
    assert proc.stdout is not None
    committed: list[str] = []
    deadline = time.monotonic() + 60
    while len(committed) < 3 * 400 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        committed += json.loads(line)
    time.sleep(delay)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # Lines printed before the kill are batches whose commit had returned.
    for line in proc.stdout.read().splitlines():
        if line.endswith("]"):
            committed += json.loads(line)
    proc.stdout.close()
    assert len(committed) >= 3 * 400, "the child did not get going"
    return committed


def test_kill_9_loses_no_committed_event(db: Database) -> None:
    """Two crash/restart rounds at different moments; afterwards every committed event is in the log once."""
    committed: list[str] = []
    for round_, delay in enumerate((0.07, 0.23)):
        committed += _run_and_kill(db.url, f"w{round_}", delay)
    with db.session() as session:
        integrated = list(session.scalars(select(LedgerEntry.event_id)))
        pending = list(session.scalars(select(LedgerPending.event_id)))
    assert not set(integrated) & set(pending)
    missing = set(committed) - set(integrated) - set(pending)
    assert not missing, f"{len(missing)} committed events were lost"
    service.sequence(db)
    with db.session() as session:
        indices = list(session.scalars(select(LedgerEntry.idx).order_by(LedgerEntry.idx)))
        ids = list(session.scalars(select(LedgerEntry.event_id)))
    assert indices == list(range(len(indices)))
    assert len(ids) == len(set(ids)) and set(committed) <= set(ids)
    assert (
        service.check_database(db, Signer("test.example/ledger", Ed25519PrivateKey.generate()), audit=AUDIT_DIGEST)
        == []
    )
