"""C2SP signed notes and tlog checkpoints with Ed25519 keys (no database, no server).

A checkpoint body is three lines, ``<origin>``, ``<size>``, ``<base64 root>``; the note appends a blank line and one
signature line per signer, ``— <name> <base64(key id || signature)>``. The key id of an Ed25519
key is the first four bytes of ``SHA-256(name || 0x0A || 0x01 || public key)``, and the verifier
key is written ``<name>+<hex key id>+<base64(0x01 || public key)>`` (C2SP signed-note).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

ALG_ED25519 = b"\x01"
SIG_PREFIX = "\u2014 "  # em dash + space starts every signature line


class NoteError(ValueError):
    """A note, checkpoint or verifier key is malformed or its signature does not verify."""


def _raw(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _check_name(name: str) -> None:
    if not name or any(c.isspace() or c == "+" for c in name):
        raise NoteError(f"invalid key name {name!r}: it must be non-empty, without spaces or '+'")


def key_id(name: str, public: Ed25519PublicKey) -> bytes:
    """Return the 4-byte C2SP key id of an Ed25519 key."""
    return hashlib.sha256(name.encode() + b"\n" + ALG_ED25519 + _raw(public)).digest()[:4]


@dataclass(frozen=True)
class Verifier:
    """A named Ed25519 public key that checks note signatures."""

    name: str
    public: Ed25519PublicKey

    @property
    def key_id(self) -> bytes:
        """The 4-byte key id."""
        return key_id(self.name, self.public)

    def vkey(self) -> str:
        """Return the verifier key string ``<name>+<hex id>+<base64(0x01||key)>``."""
        encoded = base64.b64encode(ALG_ED25519 + _raw(self.public)).decode()
        return f"{self.name}+{self.key_id.hex()}+{encoded}"

    @classmethod
    def parse(cls, vkey: str) -> Verifier:
        """Parse a verifier key string, checking that its key id matches its key."""
        parts = vkey.strip().split("+", 2)  # base64 may itself contain '+'
        if len(parts) != 3:
            raise NoteError("a verifier key has the form <name>+<hex key id>+<base64 key>")
        name, hex_id, encoded = parts
        _check_name(name)
        try:
            raw = base64.b64decode(encoded, validate=True)
            claimed = bytes.fromhex(hex_id)
        except (binascii.Error, ValueError):
            raise NoteError("the verifier key is not valid hex/base64") from None
        if len(raw) != 33 or raw[:1] != ALG_ED25519:
            raise NoteError("only Ed25519 verifier keys (algorithm 0x01, 32 bytes) are supported")
        verifier = cls(name, Ed25519PublicKey.from_public_bytes(raw[1:]))
        if claimed != verifier.key_id:
            raise NoteError("the verifier key's id does not match its name and key")
        return verifier


@dataclass(frozen=True)
class Signer:
    """A named Ed25519 private key that signs notes."""

    name: str
    private: Ed25519PrivateKey

    def __post_init__(self) -> None:
        _check_name(self.name)

    @property
    def verifier(self) -> Verifier:
        """The matching verifier."""
        return Verifier(self.name, self.private.public_key())

    def sign(self, body: str) -> str:
        """Return the signed note: ``body``, a blank line and this signer's signature line."""
        if not body.endswith("\n") or "\n\n" in body:
            raise NoteError("a note body must end with a newline and contain no blank line")
        sig = self.private.sign(body.encode())
        return f"{body}\n{SIG_PREFIX}{self.name} {base64.b64encode(self.verifier.key_id + sig).decode()}\n"


def open_note(note: str, verifier: Verifier) -> str:
    """Return the body of ``note`` after checking a signature by ``verifier``; raise :class:`NoteError`."""
    body, sep, sigs = note.rpartition("\n\n")
    if not sep or not sigs.endswith("\n"):
        raise NoteError("malformed note: no signature block")
    body += "\n"
    for line in sigs[:-1].split("\n"):
        if not line.startswith(SIG_PREFIX):
            raise NoteError("malformed note: a signature line must start with an em dash")
        name, _, encoded = line[len(SIG_PREFIX) :].partition(" ")
        if name != verifier.name:
            continue  # another witness's or cosigner's signature: not ours to check
        try:
            blob = base64.b64decode(encoded, validate=True)
        except binascii.Error:
            raise NoteError("malformed note: signature is not base64") from None
        if len(blob) != 4 + 64 or blob[:4] != verifier.key_id:
            continue
        try:
            verifier.public.verify(blob[4:], body.encode())
        except InvalidSignature:
            raise NoteError(f"the signature by {name} does not verify") from None
        return body
    raise NoteError(f"the note carries no signature by {verifier.name}+{verifier.key_id.hex()}")


@dataclass(frozen=True)
class Checkpoint:
    """A parsed tlog checkpoint body."""

    origin: str
    size: int
    root: bytes

    def body(self) -> str:
        """Return the checkpoint body text."""
        return f"{self.origin}\n{self.size}\n{base64.b64encode(self.root).decode()}\n"

    @classmethod
    def parse(cls, body: str) -> Checkpoint:
        """Parse a checkpoint body (extension lines after the root are ignored)."""
        lines = body.split("\n")
        if len(lines) < 4 or lines[-1] != "":
            raise NoteError("malformed checkpoint: expected origin, size and root lines")
        origin, size_text, root_text = lines[:3]
        if not origin or not size_text.isdigit() or (size_text != "0" and size_text.startswith("0")):
            raise NoteError("malformed checkpoint: bad origin or size line")
        try:
            root = base64.b64decode(root_text, validate=True)
        except binascii.Error:
            raise NoteError("malformed checkpoint: root is not base64") from None
        if len(root) != 32:
            raise NoteError("malformed checkpoint: root is not a SHA-256 hash")
        return cls(origin, int(size_text), root)


def verify_checkpoint(note: str, verifier: Verifier, origin: str | None = None) -> Checkpoint:
    """Check a signed checkpoint's signature (and origin, when given) and return it parsed."""
    checkpoint = Checkpoint.parse(open_note(note, verifier))
    if origin is not None and checkpoint.origin != origin:
        raise NoteError(f"checkpoint origin {checkpoint.origin!r} is not {origin!r}")
    return checkpoint


def load_or_create_key(path: Path) -> Ed25519PrivateKey:
    """Load the PEM Ed25519 key at ``path``, creating it (mode 0600) exactly once if absent."""
    if not path.exists():
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            # link() fails if another process won the race: then its key, complete on disk, is the key.
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(loaded, Ed25519PrivateKey):
        raise NoteError(f"{path} does not hold an Ed25519 private key")
    return loaded
