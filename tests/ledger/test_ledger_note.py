"""C2SP signed notes: the Go sumdb/note known-answer vector, checkpoints, and refusals."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from airlock.ledger._note import (
    Checkpoint,
    NoteError,
    Signer,
    Verifier,
    load_or_create_key,
    open_note,
    verify_checkpoint,
)

# Known-answer vector of golang.org/x/mod/sumdb/note (the reference implementation of the format).
GO_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
GO_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
GO_TEXT = "If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n"
GO_SIG = "— PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n"


def _go_signer() -> Signer:
    seed = base64.b64decode(GO_SKEY.split("+", 4)[4])[1:]
    return Signer("PeterNeumann", Ed25519PrivateKey.from_private_bytes(seed))


def test_go_known_answer() -> None:
    """Our key id, verifier key and signature line match the reference implementation byte for byte."""
    signer = _go_signer()
    assert signer.verifier.vkey() == GO_VKEY
    note = signer.sign(GO_TEXT)
    assert note == GO_TEXT + "\n" + GO_SIG
    assert open_note(note, Verifier.parse(GO_VKEY)) == GO_TEXT


def test_altered_text_or_wrong_key_is_refused() -> None:
    """One changed character, a foreign key, or a missing signature all fail."""
    note = GO_TEXT + "\n" + GO_SIG
    with pytest.raises(NoteError):
        open_note(note.replace("cryptography", "cryptographY"), Verifier.parse(GO_VKEY))
    other = Signer("PeterNeumann", Ed25519PrivateKey.generate()).verifier
    with pytest.raises(NoteError):
        open_note(note, other)
    with pytest.raises(NoteError):
        open_note(GO_TEXT, Verifier.parse(GO_VKEY))


def test_vkey_with_wrong_id_is_refused() -> None:
    """A verifier key whose id does not match its name and key is rejected."""
    with pytest.raises(NoteError):
        Verifier.parse(GO_VKEY.replace("c74f20a3", "c74f20a4"))
    with pytest.raises(NoteError):
        Verifier.parse("Peter Neumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW")


def test_checkpoint_round_trip_and_origin() -> None:
    """A signed checkpoint parses back; a different origin is refused."""
    signer = Signer("lab.example/ledger", Ed25519PrivateKey.generate())
    cp = Checkpoint("lab.example/ledger", 42, bytes(range(32)))
    note = signer.sign(cp.body())
    assert verify_checkpoint(note, signer.verifier, "lab.example/ledger") == cp
    with pytest.raises(NoteError):
        verify_checkpoint(note, signer.verifier, "other.example/ledger")
    with pytest.raises(NoteError):
        verify_checkpoint(note.replace("\n42\n", "\n43\n"), signer.verifier)


def test_key_created_once_with_owner_only_mode(tmp_path: Path) -> None:
    """The signing key is created with mode 0600 and reloaded, never regenerated."""
    path = tmp_path / "ledger" / "key.pem"
    first = load_or_create_key(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    again = load_or_create_key(path)
    assert Signer("x", first).verifier.vkey() == Signer("x", again).verifier.vkey()


def test_vkey_whose_base64_contains_plus_round_trips() -> None:
    """Base64 keys may contain '+', the vkey field separator."""
    for _ in range(64):
        verifier = Signer("lab.example/ledger", Ed25519PrivateKey.generate()).verifier
        if "+" in verifier.vkey().split("+", 2)[2]:
            assert Verifier.parse(verifier.vkey()).vkey() == verifier.vkey()
            return
    pytest.skip("no generated key had a '+' in its base64 (probability ~1e-6)")
