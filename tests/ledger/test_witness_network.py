"""Three witness processes and a lab's ledger: quorum in normal operation, a down witness, a fork refused."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from airlock.db import Database
from airlock.ledger import service
from airlock.ledger._cosig import WitnessVerifier, add_signature_lines, cosignatures, require_quorum
from airlock.ledger._merkle import MemoryTree, leaf_hash
from airlock.ledger._note import Checkpoint, NoteError, Signer
from airlock.ledger.cosign import Endpoint, cosign_newest, request_body
from airlock.ledger.verify import main as verify_main
from airlock.ledger.verify import verify_bundle
from airlock.ledger.witness import check_evidence

REPO = Path(__file__).resolve().parents[2]
ORIGINS = ("lab.example/normal", "lab.example/down", "lab.example/fork")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class WitnessProcess:
    name: str
    store: Path
    port: int
    logs: list[str]
    proc: subprocess.Popen[bytes] | None = None
    key: str = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
        args = [sys.executable, "-m", "airlock", "witness", "serve", "--store", str(self.store), "--name", self.name]
        args += [a for vkey in self.logs for a in ("--log", vkey)] + ["--port", str(self.port)]
        self.proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"witness {self.name} exited: {self.proc.stderr.read().decode() if self.proc.stderr else ''}"
                )
            try:
                self.key = httpx.get(f"{self.url}/pubkey", timeout=2).text.strip()
                return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise TimeoutError(f"witness {self.name} did not start in 120 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
        self.proc = None


@pytest.fixture(scope="module")
def labs() -> dict[str, Signer]:
    return {origin: Signer(origin, Ed25519PrivateKey.generate()) for origin in ORIGINS}


@pytest.fixture(scope="module")
def witnesses(tmp_path_factory: pytest.TempPathFactory, labs: dict[str, Signer]) -> Iterator[list[WitnessProcess]]:
    root = tmp_path_factory.mktemp("witnesses")
    vkeys = [s.verifier.vkey() for s in labs.values()]
    procs = [WitnessProcess(f"witness.example/w{i}", root / f"w{i}", _free_port(), vkeys) for i in range(3)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.wait_ready()
        yield procs
    finally:
        for p in procs:
            p.stop()


def _endpoints(procs: list[WitnessProcess]) -> list[Endpoint]:
    return [Endpoint(p.url, WitnessVerifier.parse(p.key)) for p in procs]


def _grow(db: Database, signer: Signer, n: int) -> None:
    with db.session() as session:
        for i in range(n):
            service.record_event(session, "test.event", {"i": i})
    service.publish_checkpoint(db, signer)


def _newest_note(db: Database) -> str:
    with db.session() as session:
        row = service.latest_checkpoint(session)
        assert row is not None
        return row.note


def test_normal_operation_reaches_quorum_and_the_verifier_requires_it(
    tmp_path: Path, witnesses: list[WitnessProcess], labs: dict[str, Signer]
) -> None:
    """Each new checkpoint gets three cosignatures along consistency proofs; airlock-verify checks the quorum."""
    signer, db = labs[ORIGINS[0]], Database(f"sqlite:///{tmp_path / 'lab.db'}")
    db.migrate()
    endpoints = _endpoints(witnesses)
    with httpx.Client(timeout=5) as client:
        for n in (3, 5, 9):
            _grow(db, signer, n)
            outcome = cosign_newest(db, endpoints, client=client)
            assert sorted(outcome.cosigned) == sorted(e.name for e in endpoints), outcome.failed
            assert not cosign_newest(db, endpoints, client=client).cosigned  # nothing left to ask
    assert len(require_quorum(_newest_note(db), [e.verifier for e in endpoints], 3)) == 3
    bundle = service.export_bundle(db, signer)
    keys = [p.key for p in witnesses]
    report = verify_bundle(bundle, signer.verifier.vkey(), witnesses=[e.verifier for e in endpoints], quorum=2)
    assert report.ok and report.witnessed_size == 17, report.problems
    path = tmp_path / "bundle.json"
    path.write_text(json.dumps(bundle))
    args = [str(path), "--key", signer.verifier.vkey()]
    assert verify_main([*args, *(a for k in keys for a in ("--witness", k)), "--quorum", "3"]) == 0
    # Strip the cosignatures: the lab's signature alone no longer passes.
    bundle["checkpoints"] = [
        n.split("\n\n")[0] + "\n\n" + n.split("\n\n")[1].split("\n")[0] + "\n" for n in bundle["checkpoints"]
    ]
    path.write_text(json.dumps(bundle))
    assert verify_main([*args, "--witness", keys[0], "--quorum", "1"]) == 1
    db.dispose()


def test_a_down_witness_delays_nothing_and_is_retried(
    tmp_path: Path, witnesses: list[WitnessProcess], labs: dict[str, Signer]
) -> None:
    """With one witness down the others still cosign at once; the next pass after it returns catches it up."""
    signer, db = labs[ORIGINS[1]], Database(f"sqlite:///{tmp_path / 'lab.db'}")
    db.migrate()
    endpoints = _endpoints(witnesses)
    down = witnesses[2]
    with httpx.Client(timeout=5) as client:
        _grow(db, signer, 4)
        assert len(cosign_newest(db, endpoints, client=client).cosigned) == 3
        down.stop()
        try:
            _grow(db, signer, 6)
            started = time.monotonic()
            outcome = cosign_newest(db, endpoints, client=client)
            assert time.monotonic() - started < 5  # a refused connection fails fast; nothing waits on it
            assert sorted(outcome.cosigned) == sorted(e.name for e in endpoints[:2])
            assert list(outcome.failed) == [endpoints[2].name]
            assert len(require_quorum(_newest_note(db), [e.verifier for e in endpoints], 2)) == 2
            _grow(db, signer, 2)  # the log moves on while the witness is away
            assert len(cosign_newest(db, endpoints, client=client).cosigned) == 2
        finally:
            down.start()
            down.wait_ready()
        # Back: asked from the size it last cosigned (4) to the newest (12), with a consistency proof.
        outcome = cosign_newest(db, endpoints, client=client)
        assert outcome.cosigned == [endpoints[2].name] and sorted(outcome.already) == sorted(
            e.name for e in endpoints[:2]
        )
    assert len(require_quorum(_newest_note(db), [e.verifier for e in endpoints], 3)) == 3
    db.dispose()


def test_a_fork_shown_to_one_witness_is_refused_and_never_reaches_quorum(
    tmp_path: Path, witnesses: list[WitnessProcess], labs: dict[str, Signer]
) -> None:
    """A lab that rewrites its log gets no cosignature for the fork; the refusal is evidence anyone can check."""
    signer, db = labs[ORIGINS[2]], Database(f"sqlite:///{tmp_path / 'lab.db'}")
    db.migrate()
    endpoints = _endpoints(witnesses)
    with httpx.Client(timeout=5) as client:
        _grow(db, signer, 8)
        assert len(cosign_newest(db, endpoints, client=client).cosigned) == 3
        with db.session() as session:
            entries = [e.entry for e in service.get_entries(session, 0, 8)]
        # The rewritten history: entry 2 replaced, two entries added, signed with the lab's own key.
        fork = MemoryTree()
        for i, text in enumerate(
            [*entries[:2], entries[2].replace("test.event", "test.evenT"), *entries[3:], "x", "y"]
        ):
            fork.append(leaf_hash(text.encode()))
            assert i < 10
        fork_note = signer.sign(Checkpoint(signer.name, 10, fork.root()).body())
        shown = client.post(
            f"{witnesses[0].url}/add-checkpoint", content=request_body(8, fork.consistency_proof(8, 10), fork_note)
        )
        assert shown.status_code == 422
        # Trying the others, too: every witness refuses, so no quorum of any size can form.
        same_size = signer.sign(Checkpoint(signer.name, 8, fork.root(8)).body())
        for p in witnesses:
            assert client.post(f"{p.url}/add-checkpoint", content=request_body(8, [], same_size)).status_code == 422
        replies = [
            client.post(f"{p.url}/add-checkpoint", content=request_body(8, fork.consistency_proof(8, 10), fork_note))
            for p in witnesses[1:]
        ]
        assert [r.status_code for r in replies] == [422, 422]
        with pytest.raises(NoteError, match="fewer than the quorum"):
            require_quorum(fork_note, [e.verifier for e in endpoints], 1)
        # The honest log carries on and is cosigned as before.
        _grow(db, signer, 1)
        assert len(cosign_newest(db, endpoints, client=client).cosigned) == 3
        evidence = client.get(f"{witnesses[0].url}/evidence").json()
    mine = [r for r in evidence if r["origin"] == signer.name]
    assert len(mine) == 2
    for record in mine:
        proven, why = check_evidence(record, signer.verifier)
        assert proven, why
        # The witnessed half carries the witness's own cosignature: it is not the lab's word alone.
        assert cosignatures(record["witnessed"], [endpoints[0].verifier])[0]
    path = tmp_path / "evidence.json"
    path.write_text(json.dumps(mine))
    assert verify_main(["--evidence", str(path), "--key", signer.verifier.vkey()]) == 0
    # A cosignature copied onto the fork does not verify there.
    stolen = _newest_note(db).split("\n\n")[1].split("\n")[1]
    assert not cosignatures(add_signature_lines(fork_note, [stolen]), [endpoints[0].verifier])[0]
    db.dispose()
