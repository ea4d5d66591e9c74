"""Redaction markup and salted SHA-256 commitments that third parties can verify.

Markup in a report's Markdown::

    [[redact:reason]]secret text[[/redact]]      (the reason is optional: [[redact]]...[[/redact]])

Each marked span is replaced in the public text by a placeholder that carries its commitment::

    [[redacted #1 (reason) sha256:<64 hex digits>]]

Commitment byte layout (what a verifier recomputes)::

    commitment = SHA-256( salt || UTF-8(text) )

where ``salt`` is 32 random bytes from :mod:`secrets`, published as 64 lowercase hex digits when
the span is revealed, ``text`` is the exact span between the tags (no trimming, no Unicode
normalisation) and ``||`` is plain concatenation. The commitment is written as 64 lowercase hex
digits. Example check in a shell: ``printf '%s' "$TEXT" | cat <(xxd -r -p <<<"$SALT") - | sha256sum``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from airlock.errors import InvalidRequestError

SALT_BYTES = 32
MAX_REASON_CHARS = 200
MAX_REDACTIONS = 200

# Any "[[redact" or "[[/redact" starts a tag; the strict pattern below decides whether it is a
# well-formed one. Requiring every such prefix to be a valid tag also keeps authors from typing
# something that looks like a placeholder ("[[redacted ...]]") into their own text; "[[revealed"
# (the marker of a revealed span) is refused too. The HTML page never trusts look-alikes anyway:
# it marks only the real placeholders of the report (see pages.py).
_TAG_START = re.compile(r"\[\[(?:/?redact|revealed)", re.IGNORECASE)
_RESERVED = ("[[redacted", "[[revealed")
_TAG = re.compile(r"\[\[(?P<close>/)?redact(?::(?P<reason>[^\[\]\n]*))?\]\]")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Span:
    """One redacted span of a source text, in document order (``number`` starts at 1)."""

    number: int
    reason: str
    text: str


@dataclass(frozen=True)
class Sealed:
    """A span with its salt and commitment (both lowercase hex)."""

    number: int
    reason: str
    text: str
    salt: str
    commitment: str


def commit(text: str, salt: bytes) -> str:
    """Return ``SHA-256(salt || UTF-8(text))`` as lowercase hex."""
    return hashlib.sha256(salt + text.encode("utf-8")).hexdigest()


def verify_commitment(commitment: str, salt_hex: str, text: str) -> bool:
    """Return True when ``text`` with ``salt_hex`` opens ``commitment`` (constant-time compare)."""
    if not _HEX64.match(commitment) or not _HEX64.match(salt_hex):
        return False
    return hmac.compare_digest(commit(text, bytes.fromhex(salt_hex)), commitment)


def placeholder(number: int, reason: str, commitment: str) -> str:
    """Return the public placeholder that stands in for a redacted span."""
    why = f" ({reason})" if reason else ""
    return f"[[redacted #{number}{why} sha256:{commitment}]]"


def revealed_marker(number: int, commitment: str) -> str:
    """Return the marker that follows a revealed span's text in ``body_revealed``."""
    return f"[[revealed #{number} sha256:{commitment}]]"


def parse(source: str) -> tuple[list[str], list[Span]]:
    """Split ``source`` into literal pieces and spans: ``pieces[i]`` precedes ``spans[i]``.

    ``len(pieces) == len(spans) + 1``. Malformed markup (nesting, an unclosed or stray tag, an
    empty span, a tag-like ``[[redact...`` that is not a tag) raises a 400 naming the line.
    """
    pieces: list[str] = []
    spans: list[Span] = []
    pos = 0
    open_tag: re.Match[str] | None = None
    for start in _TAG_START.finditer(source):
        if source[start.start() : start.start() + 10].lower() in _RESERVED:
            raise _malformed(source, start.start(), "placeholders and reveal markers are written by Airlock, not typed")
        tag = _TAG.match(source, start.start())
        if tag is None:
            raise _malformed(source, start.start(), "is not a valid [[redact:reason]] or [[/redact]] tag")
        if tag.group("close"):
            if open_tag is None:
                raise _malformed(source, tag.start(), "closes a redaction that was never opened")
            if tag.group("reason") is not None:
                raise _malformed(source, tag.start(), "a closing tag takes no reason")
            text = source[open_tag.end() : tag.start()]
            if not text.strip():
                raise _malformed(source, open_tag.start(), "redacts nothing")
            spans.append(Span(number=len(spans) + 1, reason=(open_tag.group("reason") or "").strip(), text=text))
            pos = tag.end()
            open_tag = None
        else:
            if open_tag is not None:
                raise _malformed(source, tag.start(), "redactions cannot be nested")
            reason = (tag.group("reason") or "").strip()
            if len(reason) > MAX_REASON_CHARS:
                raise _malformed(source, tag.start(), f"the reason is over {MAX_REASON_CHARS} characters")
            pieces.append(source[pos : tag.start()])
            open_tag = tag
    if open_tag is not None:
        raise _malformed(source, open_tag.start(), "is never closed with [[/redact]]")
    if len(spans) > MAX_REDACTIONS:
        raise InvalidRequestError(f"at most {MAX_REDACTIONS} redactions per report", code="too_many_redactions")
    pieces.append(source[pos:])
    return pieces, spans


def seal(spans: list[Span]) -> list[Sealed]:
    """Give every span a fresh 32-byte random salt and its commitment."""
    sealed = []
    for span in spans:
        salt = secrets.token_bytes(SALT_BYTES)
        sealed.append(Sealed(span.number, span.reason, span.text, salt.hex(), commit(span.text, salt)))
    return sealed


def render_public(pieces: list[str], sealed: list[Sealed]) -> str:
    """Return the public text: every span replaced by its placeholder."""
    if len(pieces) != len(sealed) + 1:
        raise ValueError("pieces and spans do not interleave")
    out = [pieces[0]]
    for item, piece in zip(sealed, pieces[1:], strict=True):
        out.append(placeholder(item.number, item.reason, item.commitment))
        out.append(piece)
    return "".join(out)


def _malformed(source: str, offset: int, problem: str) -> InvalidRequestError:
    line = source.count("\n", 0, offset) + 1
    snippet = source[offset : offset + 30].split("\n", 1)[0]
    return InvalidRequestError(
        f"malformed redaction markup at line {line} ({snippet!r}): {problem}", code="malformed_redaction", param="body"
    )
