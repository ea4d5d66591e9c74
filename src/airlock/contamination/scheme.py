"""The fingerprint scheme: normalisation, word shingles, keyed hashes, and the fingerprint file.

An evaluator fingerprints its test set on its own machine and sends only the result: for each
item an opaque id and the sorted set of 32-bit shingle hashes. A shingle is ``ngram`` consecutive
normalised words; its hash is keyed by a random per-registration salt:

- **Normalisation**: Unicode NFKC, then case folding, then every run of characters that are not
  letters or digits becomes one space (punctuation, symbols, underscores, whitespace); words are
  what is left between spaces. Case, punctuation and spacing edits therefore change nothing.
- **Word keys**: ``k(w) = HMAC-SHA256(salt, utf8(w))``, first 8 bytes, little-endian.
- **Shingle hash**: ``fmix64(Σ k(w_j) · M_j mod 2^64)`` (position-dependent odd constants ``M_j``,
  MurmurHash3's 64-bit finaliser), top 32 bits. Keying each *word* with HMAC rather than each
  shingle lets the lab's check compute one HMAC per distinct word of its corpus and combine
  them with array arithmetic, which is what makes millions of shingles a second possible.
- **Informative shingles only**: a shingle made only of stop words ("of the and") is dropped on
  the evaluator's side, so common phrases cannot make unrelated text match.

An item matches a document when at least ``threshold`` of the item's shingles occur in it (and
at least ``min(min_shingles, item's shingles)``): a few swapped or deleted words only remove the
shingles around them, so edited copies still match, while unrelated text shares almost none.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "FORMAT",
    "MIX",
    "STOP_WORDS",
    "Fingerprint",
    "FingerprintedItem",
    "Scheme",
    "fingerprint_items",
    "item_shingles",
    "normalize",
    "shingle_hash",
    "word_key",
    "words",
]

FORMAT = "airlock-contamination-fingerprint/1"
"""The ``format`` field of a fingerprint file; a reader refuses any other."""

# Odd multipliers (position j of a shingle uses MIX[j]): distinct, so word order matters.
MIX: tuple[int, ...] = (
    0x9E3779B97F4A7C15,
    0xC2B2AE3D27D4EB4F,
    0x165667B19E3779F9,
    0xD6E8FEB86659FD93,
    0xFF51AFD7ED558CCD,
    0xC4CEB9FE1A85EC53,
    0x94D049BB133111EB,
    0xBF58476D1CE4E5B9,
)
_M64 = (1 << 64) - 1
_FMIX1 = 0xFF51AFD7ED558CCD
_FMIX2 = 0xC4CEB9FE1A85EC53

# English function words; a shingle made only of these carries no information about an item.
STOP_WORDS: frozenset[str] = frozenset(
    " ".join(
        (
            "a about above after again against all am an and any are as at be because been before being",
            "below between both but by can could did do does doing down during each few for from further",
            "had has have having he her here hers herself him himself his how i if in into is it its itself",
            "just me more most my myself no nor not now of off on once only or other our ours ourselves out",
            "over own same she should so some such than that the their theirs them themselves then there",
            "these they this those through to too under until up very was we were what when where which",
            "while who whom why will with would you your yours yourself yourselves s t",
        )
    ).split()
)

_NON_WORD = re.compile(r"[\W_]+")


def normalize(text: str) -> str:
    """Return ``text`` NFKC-normalised, case-folded, with every non-alphanumeric run as one space."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    return _NON_WORD.sub(" ", folded).strip()


def words(text: str) -> list[str]:
    """Return the normalised words of ``text``."""
    return normalize(text).split()


def word_key(salt: bytes, word: str) -> int:
    """Return the 64-bit keyed value of one normalised word: HMAC-SHA256(salt, word), first 8 bytes."""
    return int.from_bytes(hmac.new(salt, word.encode("utf-8"), hashlib.sha256).digest()[:8], "little")


def _fmix64(h: int) -> int:
    h ^= h >> 33
    h = (h * _FMIX1) & _M64
    h ^= h >> 33
    h = (h * _FMIX2) & _M64
    return h ^ (h >> 33)


def shingle_hash(keys: Sequence[int]) -> int:
    """Return the 32-bit hash of one shingle from its words' keys (the reference the array code matches)."""
    acc = 0
    for j, k in enumerate(keys):
        acc = (acc + k * MIX[j]) & _M64
    return _fmix64(acc) >> 32


@dataclass(frozen=True)
class Scheme:
    """The parameters both sides must share: shingle length and the matching rule."""

    ngram: int = 3
    threshold: float = 0.4
    min_shingles: int = 3

    def __post_init__(self) -> None:
        if not 2 <= self.ngram <= len(MIX):
            raise ValueError(f"ngram must be between 2 and {len(MIX)}")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError("threshold must be in (0, 1]")
        if self.min_shingles < 1:
            raise ValueError("min_shingles must be at least 1")

    def to_json(self) -> dict[str, Any]:
        """Return the scheme as stored in a fingerprint file."""
        return {
            "normalization": "nfkc-casefold-alnum",
            "hash": "hmac-sha256-words-fmix64-32",
            "stop_words": "airlock-en-1",
            "ngram": self.ngram,
            "threshold": self.threshold,
            "min_shingles": self.min_shingles,
        }


def item_shingles(text: str, salt: bytes, ngram: int) -> npt.NDArray[np.uint32]:
    """Return the sorted, distinct informative shingle hashes of one test item."""
    ws = words(text)
    cache: dict[str, int] = {}
    hashes: set[int] = set()
    for i in range(len(ws) - ngram + 1):
        gram = ws[i : i + ngram]
        if all(w in STOP_WORDS for w in gram):
            continue
        keys = []
        for w in gram:
            if w not in cache:
                cache[w] = word_key(salt, w)
            keys.append(cache[w])
        hashes.add(shingle_hash(keys))
    return np.array(sorted(hashes), dtype=np.uint32)


@dataclass
class FingerprintedItem:
    """One test item as the lab sees it: an opaque id and its shingle hashes."""

    id: str
    shingles: npt.NDArray[np.uint32]


@dataclass
class Fingerprint:
    """A fingerprinted test set: salt, scheme, and per item its shingle hashes (never the text)."""

    name: str
    salt: bytes
    scheme: Scheme
    items: list[FingerprintedItem] = field(default_factory=list)
    skipped: int = 0
    """Items too short to give any informative shingle (they cannot be checked)."""

    def to_json(self) -> dict[str, Any]:
        """Return the JSON document the evaluator uploads (hashes as base64 little-endian uint32)."""
        return {
            "format": FORMAT,
            "name": self.name,
            "salt": self.salt.hex(),
            "scheme": self.scheme.to_json(),
            "skipped": self.skipped,
            "items": [
                {"id": item.id, "shingles": base64.b64encode(item.shingles.astype("<u4").tobytes()).decode("ascii")}
                for item in self.items
            ],
        }

    @classmethod
    def from_json(cls, data: Any) -> Fingerprint:
        """Parse and check a fingerprint document; ``ValueError`` names what is wrong."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"not a fingerprint file (format must be {FORMAT!r})")
        try:
            salt = bytes.fromhex(str(data["salt"]))
            raw = data["scheme"]
            scheme = Scheme(int(raw["ngram"]), float(raw["threshold"]), int(raw["min_shingles"]))
            expected = scheme.to_json()
            for key in ("normalization", "hash", "stop_words"):
                if raw.get(key) != expected[key]:
                    raise ValueError(f"unsupported scheme {key} {raw.get(key)!r} (this version: {expected[key]!r})")
            items = []
            seen: set[str] = set()
            for entry in data["items"]:
                item_id = str(entry["id"])
                if not item_id or len(item_id) > 200 or item_id in seen:
                    raise ValueError(f"item ids must be distinct, 1-200 characters (got {item_id[:40]!r})")
                seen.add(item_id)
                blob = base64.b64decode(str(entry["shingles"]), validate=True)
                if not blob or len(blob) % 4:
                    raise ValueError(f"item {item_id!r}: shingles must be a non-empty array of uint32")
                hashes = np.frombuffer(blob, dtype="<u4").astype(np.uint32)
                if np.any(hashes[1:] <= hashes[:-1]):
                    raise ValueError(f"item {item_id!r}: shingles must be sorted and distinct")
                items.append(FingerprintedItem(item_id, hashes))
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"malformed fingerprint file: missing or wrong field {exc}") from None
        except binascii.Error as exc:
            raise ValueError(f"malformed fingerprint file: {exc}") from None
        if len(salt) < 16:
            raise ValueError("the salt must be at least 16 bytes")
        if not items:
            raise ValueError("the fingerprint has no items")
        return cls(str(data.get("name") or ""), salt, scheme, items, int(data.get("skipped") or 0))


def fingerprint_items(
    items: Iterable[tuple[str, str]], *, name: str = "", scheme: Scheme | None = None, salt: bytes | None = None
) -> Fingerprint:
    """Fingerprint ``(id, text)`` test items under a fresh random salt (evaluator side, offline)."""
    scheme = scheme or Scheme()
    fp = Fingerprint(name, salt or secrets.token_bytes(32), scheme)
    for item_id, text in items:
        hashes = item_shingles(text, fp.salt, scheme.ngram)
        if hashes.size == 0:
            fp.skipped += 1
            continue
        fp.items.append(FingerprintedItem(item_id, hashes))
    return fp
