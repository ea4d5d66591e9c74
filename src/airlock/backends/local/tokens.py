"""The exact bytes of every token id, read from the tokenizer's vocabulary (byte-level BPE or sentencepiece)."""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Sequence
from typing import Any


def _bytes_to_unicode() -> dict[int, str]:
    """Return GPT-2's byte → printable-character map used by byte-level BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def _decoder_types(tokenizer: Any) -> set[str]:
    """Return the ``type`` names inside the fast tokenizer's decoder (empty for slow tokenizers)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    if decoder is None:
        return set()
    try:
        state = json.loads(decoder.__getstate__())
    except (TypeError, ValueError, AttributeError):
        return {type(decoder).__name__}
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("type"), str):
                found.add(node["type"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(state)
    return found


class TokenTable:
    """The exact bytes of every token id, so text is decoded incrementally from a byte stream.

    Decoding bytes (rather than re-decoding token lists) makes streaming exact: a multi-byte
    character split across tokens is emitted once its last byte arrives, never as garbage.
    """

    _SP_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        size = max(vocab_size, len(tokenizer))
        tokens: list[str | None] = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        added = set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
        kinds = _decoder_types(tokenizer)
        byte_decoder = {c: b for b, c in _bytes_to_unicode().items()}
        table: list[bytes] = []
        for token_id, token in enumerate(tokens):
            if token is None:
                table.append(b"")
            elif token_id in added:
                table.append(token.encode())  # special/added tokens are literal text
            elif "ByteLevel" in kinds:
                try:
                    table.append(bytes(byte_decoder[c] for c in token))
                except KeyError:
                    table.append(token.encode())
            elif "ByteFallback" in kinds or "Metaspace" in kinds:
                match = self._SP_BYTE.fullmatch(token)
                table.append(bytes([int(match.group(1), 16)]) if match else token.replace("▁", " ").encode())
            else:
                table.append(tokenizer.decode([token_id]).encode())
        table.extend(b"" for _ in range(size - len(table)))
        self.bytes: list[bytes] = table
        self._text: dict[int, str] = {}

    def text(self, token_id: int) -> str:
        r"""Return a display string for one token (``bytes:\xNN`` for partial UTF-8, as OpenAI does)."""
        cached = self._text.get(token_id)
        if cached is None:
            raw = self.bytes[token_id] if 0 <= token_id < len(self.bytes) else b""
            try:
                cached = raw.decode("utf-8")
            except UnicodeDecodeError:
                cached = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
            self._text[token_id] = cached
        return cached

    def decode(self, ids: Sequence[int]) -> str:
        """Return the text of ``ids`` (invalid UTF-8 replaced)."""
        return b"".join(self.bytes[i] for i in ids).decode("utf-8", errors="replace")

    def offsets(self, ids: Sequence[int]) -> list[int]:
        """Return the character offset at which each token's text starts in ``decode(ids)``."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        out: list[int] = []
        length = 0
        for token_id in ids:
            out.append(length)
            length += len(decoder.decode(self.bytes[token_id]))
        return out
