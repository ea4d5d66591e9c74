"""C2SP tlog-cosignature/v1 and the tlog-witness add-checkpoint rules, on the witness object itself."""

from __future__ import annotations

import base64
import hashlib
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from airlock.ledger._cosig import Cosigner, WitnessVerifier, add_signature_lines, cosignatures, require_quorum
from airlock.ledger._merkle import MemoryTree, leaf_hash
from airlock.ledger._note import Checkpoint, NoteError, Signer
from airlock.ledger.cosign import request_body
from airlock.ledger.witness import SIZE_CONTENT_TYPE, Witness, check_evidence

ORIGIN = "lab.example/ledger"


def _tree(n: int, *, tag: str = "") -> MemoryTree:
    tree = MemoryTree()
    for i in range(n):
        tree.append(leaf_hash(f"entry {i}{tag if i == 3 else ''}".encode()))
    return tree


def _note(signer: Signer, tree: MemoryTree, size: int) -> str:
    return signer.sign(Checkpoint(ORIGIN, size, tree.root(size)).body())


@pytest.fixture
def lab() -> Signer:
    return Signer(ORIGIN, Ed25519PrivateKey.generate())


@pytest.fixture
def witness(tmp_path: Path, lab: Signer) -> Witness:
    return Witness(Cosigner("witness.example/w1", Ed25519PrivateKey.generate()), [lab.verifier], tmp_path / "w.db")


def test_cosignature_layout_follows_the_spec() -> None:
    """Key id, timestamp and signed message are exactly as c2sp.org/tlog-cosignature spells them."""
    private = Ed25519PrivateKey.generate()
    cosigner = Cosigner("witness.example/w1", private)
    body = f"{ORIGIN}\n7\n{base64.b64encode(bytes(32)).decode()}\n"
    line = cosigner.cosign(body, timestamp=1679315147)
    name, encoded = line.rstrip("\n").removeprefix("\u2014 ").split(" ")
    blob = base64.b64decode(encoded)
    raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert name == "witness.example/w1"
    assert blob[:4] == hashlib.sha256(b"witness.example/w1\n\x04" + raw).digest()[:4]
    assert struct.unpack(">Q", blob[4:12]) == (1679315147,)
    private.public_key().verify(blob[12:], b"cosignature/v1\ntime 1679315147\n" + body.encode())
    vkey = cosigner.verifier.vkey()
    assert vkey.startswith("witness.example/w1+") and WitnessVerifier.parse(vkey) == cosigner.verifier
    with pytest.raises(NoteError):
        cosigner.cosign(body, timestamp=0)


def test_cosignatures_count_distinct_known_keys_and_reject_forgeries(lab: Signer) -> None:
    """Unknown keys are ignored; a known key's bad signature is a problem; the quorum counts distinct witnesses."""
    w1, w2, other = (Cosigner(f"w.example/{i}", Ed25519PrivateKey.generate()) for i in range(3))
    note = _note(lab, _tree(5), 5)
    body = note.split("\n\n")[0] + "\n"
    cosigned = add_signature_lines(note, [w1.cosign(body), w2.cosign(body), other.cosign(body)])
    assert add_signature_lines(cosigned, [w1.cosign(body, 5)]).count("w.example/0") == 2
    valid, problems = cosignatures(cosigned, [w1.verifier, w2.verifier])
    assert {c.name for c in valid} == {"w.example/0", "w.example/1"} and not problems
    assert len(require_quorum(cosigned, [w1.verifier, w2.verifier], 2)) == 2
    with pytest.raises(NoteError, match="fewer than the quorum"):
        require_quorum(add_signature_lines(note, [w1.cosign(body)]), [w1.verifier, w2.verifier], 2)
    with pytest.raises(NoteError, match="distinct witness keys"):
        require_quorum(cosigned, [w1.verifier, w1.verifier], 2)
    # A cosignature over another body (a different root) fails under the witness's key.
    forged = cosigned.replace(body, f"{ORIGIN}\n5\n{base64.b64encode(bytes(32)).decode()}\n")
    valid, problems = cosignatures(forged, [w1.verifier])
    assert not valid and problems


def test_add_checkpoint_status_codes(witness: Witness, lab: Signer) -> None:
    """404, 403, 400, 409 (with the size), 422 and 200 exactly where c2sp.org/tlog-witness puts them."""
    tree = _tree(12)
    stranger = Signer("other.example/log", Ed25519PrivateKey.generate())
    assert (
        witness.add_checkpoint(request_body(0, [], stranger.sign(f"other.example/log\n1\n{'A' * 43}=\n"))).status == 404
    )
    impostor = Signer(ORIGIN, Ed25519PrivateKey.generate())
    assert witness.add_checkpoint(request_body(0, [], _note(impostor, tree, 4))).status == 403
    assert witness.add_checkpoint(b"old 01\n\n" + _note(lab, tree, 4).encode()).status == 400
    assert witness.add_checkpoint(b"no blank line").status == 400
    assert witness.add_checkpoint(request_body(5, [], _note(lab, tree, 4))).status == 400  # old above size
    bad_empty = lab.sign(f"{ORIGIN}\n0\n{base64.b64encode(bytes(32)).decode()}\n")
    assert witness.add_checkpoint(request_body(0, [], bad_empty)).status == 422
    assert witness.add_checkpoint(request_body(0, [tree.root(1)], _note(lab, tree, 4))).status == 422

    first = witness.add_checkpoint(request_body(0, [], _note(lab, tree, 4)))
    assert first.status == 200
    assert witness.verifier.check(Checkpoint(ORIGIN, 4, tree.root(4)).body(), first.body.rstrip("\n"))
    stale = witness.add_checkpoint(request_body(0, [], _note(lab, tree, 9)))
    assert (stale.status, stale.body, stale.content_type) == (409, "4\n", SIZE_CONTENT_TYPE)
    wrong_proof = tree.consistency_proof(3, 9)
    assert witness.add_checkpoint(request_body(4, wrong_proof, _note(lab, tree, 9))).status == 422
    assert witness.add_checkpoint(request_body(4, tree.consistency_proof(4, 9), _note(lab, tree, 9))).status == 200
    rollback = witness.add_checkpoint(request_body(9, [], _note(lab, tree, 4)))
    assert rollback.status == 400
    again = witness.add_checkpoint(request_body(9, [], _note(lab, tree, 9)))
    assert again.status == 200  # the same tree head may be cosigned again
    monitor = witness.latest(hashlib.sha256(ORIGIN.encode()).hexdigest())
    assert monitor.status == 200 and monitor.body.startswith(f"{ORIGIN}\n9\n")
    assert len(cosignatures(monitor.body, [witness.verifier])[0]) == 1
    assert witness.latest("00" * 32).status == 404


def test_forks_are_refused_and_kept_as_checkable_evidence(witness: Witness, lab: Signer) -> None:
    """A rewritten log shown to the witness is refused; the refusal proves the fork to anyone with the lab's key."""
    honest, forked = _tree(10), _tree(14, tag="rewritten")
    assert witness.add_checkpoint(request_body(0, [], _note(lab, honest, 10))).status == 200
    # Same size, another root.
    assert witness.add_checkpoint(request_body(10, [], _note(lab, forked, 10))).status == 422
    # Larger, with the rewritten log's own (self-consistent) proof: it cannot lead from the cosigned root.
    proof = forked.consistency_proof(10, 14)
    assert witness.add_checkpoint(request_body(10, proof, _note(lab, forked, 14))).status == 422
    records = witness.evidence()
    assert [r["status"] for r in records] == [422, 422]
    for record in records:
        proven, why = check_evidence(record, lab.verifier)
        assert proven, why
    # The honest log is still cosigned: the witness's state never moved to the fork.
    assert witness.add_checkpoint(request_body(10, [], _note(lab, honest, 10))).status == 200
    # Evidence does not convict an honest log, and a tampered record does not check.
    other_lab = Signer(ORIGIN, Ed25519PrivateKey.generate())
    assert not check_evidence(records[0], other_lab.verifier)[0]
    honest_record = dict(records[1], submitted=_note(lab, honest, 10))
    assert not check_evidence(honest_record, lab.verifier)[0]
