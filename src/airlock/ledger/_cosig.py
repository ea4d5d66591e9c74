"""C2SP tlog-cosignature/v1 with Ed25519 (signature type 0x04): witness keys, cosigning, quorum checks.

A cosignature is a note signature line ``— <witness name> base64(key id || u64 timestamp || sig)``
where the Ed25519 signature covers the line ``cosignature/v1``, the line ``time <timestamp>`` and then the
checkpoint body. The key id is ``SHA-256(name || 0x0A || 0x04 || public key)[:4]`` and the
witness's verifier key is ``<name>+<hex key id>+<base64(0x04 || public key)>``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from airlock.ledger._note import SIG_PREFIX, NoteError, _check_name

ALG_COSIGNATURE_V1 = b"\x04"
COSIGNATURE_HEADER = "cosignature/v1\n"
_COSIG_LEN = 4 + 8 + 64
MAX_TIMESTAMP = 2**63 - 1


def _raw(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def cosigned_message(body: str, timestamp: int) -> bytes:
    """Return the bytes an Ed25519 cosignature signs: header, time line, then the checkpoint body."""
    return f"{COSIGNATURE_HEADER}time {timestamp}\n{body}".encode()


def split_note(note: str) -> tuple[str, list[str]]:
    """Split a signed note into its body (with the final newline) and its signature lines."""
    body, sep, sigs = note.rpartition("\n\n")
    if not sep or not sigs.endswith("\n"):
        raise NoteError("malformed note: no signature block")
    lines = sigs[:-1].split("\n")
    if not all(line.startswith(SIG_PREFIX) for line in lines):
        raise NoteError("malformed note: a signature line must start with an em dash")
    return body + "\n", lines


def add_signature_lines(note: str, lines: Iterable[str]) -> str:
    """Return ``note`` with the signature ``lines`` appended (lines already present are not repeated)."""
    body, existing = split_note(note)
    merged = list(existing)
    for line in lines:
        line = line.rstrip("\n")
        if not line.startswith(SIG_PREFIX):
            raise NoteError("a signature line must start with an em dash")
        if line not in merged:
            merged.append(line)
    return body + "\n" + "".join(f"{line}\n" for line in merged)


@dataclass(frozen=True)
class Cosignature:
    """A verified cosignature: who signed, when (POSIX seconds), and the signature line itself."""

    name: str
    timestamp: int
    line: str


@dataclass(frozen=True)
class WitnessVerifier:
    """A witness's named Ed25519 public key, checking tlog-cosignature/v1 lines."""

    name: str
    public: Ed25519PublicKey

    @property
    def key_id(self) -> bytes:
        """The 4-byte key id (signature type 0x04)."""
        return hashlib.sha256(self.name.encode() + b"\n" + ALG_COSIGNATURE_V1 + _raw(self.public)).digest()[:4]

    def vkey(self) -> str:
        """Return the verifier key string ``<name>+<hex id>+<base64(0x04||key)>``."""
        encoded = base64.b64encode(ALG_COSIGNATURE_V1 + _raw(self.public)).decode()
        return f"{self.name}+{self.key_id.hex()}+{encoded}"

    @classmethod
    def parse(cls, vkey: str) -> WitnessVerifier:
        """Parse a witness verifier key, checking its type and that its key id matches."""
        parts = vkey.strip().split("+", 2)
        if len(parts) != 3:
            raise NoteError("a witness key has the form <name>+<hex key id>+<base64 key>")
        name, hex_id, encoded = parts
        _check_name(name)
        try:
            raw = base64.b64decode(encoded, validate=True)
            claimed = bytes.fromhex(hex_id)
        except (binascii.Error, ValueError):
            raise NoteError("the witness key is not valid hex/base64") from None
        if len(raw) != 33 or raw[:1] != ALG_COSIGNATURE_V1:
            raise NoteError("a witness key must be an Ed25519 cosignature/v1 key (type 0x04, 32 bytes)")
        verifier = cls(name, Ed25519PublicKey.from_public_bytes(raw[1:]))
        if claimed != verifier.key_id:
            raise NoteError("the witness key's id does not match its name and key")
        return verifier

    def check(self, body: str, line: str) -> Cosignature | None:
        """Return the cosignature if ``line`` is this witness's (None for another key); raise if it fails."""
        if not line.startswith(SIG_PREFIX):
            return None
        name, _, encoded = line[len(SIG_PREFIX) :].partition(" ")
        if name != self.name:
            return None
        try:
            blob = base64.b64decode(encoded, validate=True)
        except binascii.Error:
            return None
        if len(blob) != _COSIG_LEN or blob[:4] != self.key_id:
            return None  # same name, another key or type: ignored, as signed-note requires
        (timestamp,) = struct.unpack(">Q", blob[4:12])
        if timestamp > MAX_TIMESTAMP:
            raise NoteError(f"the cosignature by {name} has an out-of-range timestamp")
        try:
            self.public.verify(blob[12:], cosigned_message(body, timestamp))
        except InvalidSignature:
            raise NoteError(f"the cosignature by {name} does not verify") from None
        return Cosignature(name, timestamp, line)


@dataclass(frozen=True)
class Cosigner:
    """A witness's named Ed25519 private key, producing tlog-cosignature/v1 lines."""

    name: str
    private: Ed25519PrivateKey

    def __post_init__(self) -> None:
        _check_name(self.name)

    @property
    def verifier(self) -> WitnessVerifier:
        """The matching verifier."""
        return WitnessVerifier(self.name, self.private.public_key())

    def cosign(self, body: str, timestamp: int | None = None) -> str:
        """Return one cosignature line (with its newline) over the checkpoint ``body``."""
        # A zero timestamp would make no statement about freshness; the protocol forbids it.
        ts = int(time.time()) if timestamp is None else timestamp
        if not 0 < ts <= MAX_TIMESTAMP:
            raise NoteError("a cosignature timestamp must be positive")
        sig = self.private.sign(cosigned_message(body, ts))
        blob = self.verifier.key_id + struct.pack(">Q", ts) + sig
        return f"{SIG_PREFIX}{self.name} {base64.b64encode(blob).decode()}\n"


def cosignatures(note: str, witnesses: Sequence[WitnessVerifier]) -> tuple[list[Cosignature], list[str]]:
    """Return the valid cosignatures on ``note`` by distinct ``witnesses``, and a problem per failing one.

    Lines from unknown keys are ignored; a line from a known key that fails to verify is a
    problem (the note is then suspect) and does not count.
    """
    body, lines = split_note(note)
    found: dict[str, Cosignature] = {}
    problems: list[str] = []
    for witness in witnesses:
        for line in lines:
            try:
                cosig = witness.check(body, line)
            except NoteError as exc:
                problems.append(str(exc))
                continue
            if cosig is not None:
                found.setdefault(witness.vkey(), cosig)
    return list(found.values()), problems


def require_quorum(note: str, witnesses: Sequence[WitnessVerifier], quorum: int) -> list[Cosignature]:
    """Return the valid cosignatures when at least ``quorum`` distinct witnesses cosigned; raise otherwise."""
    if quorum < 1:
        raise NoteError("a quorum is at least 1")
    if quorum > len({w.vkey() for w in witnesses}):
        raise NoteError(f"a quorum of {quorum} needs at least {quorum} distinct witness keys")
    valid, problems = cosignatures(note, witnesses)
    if problems:
        raise NoteError("; ".join(problems))
    if len(valid) < quorum:
        names = ", ".join(c.name for c in valid) or "none"
        raise NoteError(f"{len(valid)} valid cosignature(s) ({names}), fewer than the quorum of {quorum}")
    return valid
