"""The lab's check: a batch of corpus documents against registered fingerprints, in array arithmetic.

Per batch, the documents are joined into one byte buffer and normalised with one table
translation (in documents that are not ASCII, each non-ASCII run, with the character before it,
is first NFKC-normalised and case-folded, cached per distinct run); word boundaries, a 64-bit
hash of every word (its bytes read 8 at a time as unaligned integers) and each word's dense id in
the check's vocabulary are numpy operations. Only a word never seen before in this check reaches
Python: its HMAC under each registration's salt is computed once. Shingle hashes are then a few
multiply-adds over the word keys; a 2^24-bit bitmap discards almost every shingle before an
exact sorted lookup, and hits are counted per (document, item).
"""

from __future__ import annotations

import hashlib
import multiprocessing
import unicodedata
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from airlock.contamination.scheme import MIX, Fingerprint, Scheme

__all__ = ["Checker", "Match", "check_batches", "keyed_words", "prepare_batch"]

U64 = np.uint64
_SLOT_BITS = 22
_MAX_VOCABULARY = 2_000_000  # distinct words kept per check (a few hundred MB); then it starts afresh
_BITMAP_BITS = 24
_SEP = "\ue000"  # a private-use character: NFKC and case folding leave it alone
# One odd multiplier per 8-byte chunk of a word (words up to 256 bytes), and one for its length.
_CHUNK_MULS = tuple(
    (int.from_bytes(hashlib.sha256(b"airlock-chunk-%d" % k).digest()[:8], "little") | 1) for k in range(33)
)

# ASCII: letters lowered, digits kept, everything else a space; bytes >= 0x80 (UTF-8) unchanged.
_TABLE = bytes(
    (c + 32 if 65 <= c <= 90 else c if (48 <= c <= 57 or 97 <= c <= 122 or c >= 128) else 32) for c in range(256)
)
# Little-endian masks keeping the first L bytes of an 8-byte word, L = 0..8.
_KEEP = np.array([(1 << (8 * n)) - 1 if n < 8 else (1 << 64) - 1 for n in range(9)], dtype=np.uint64)


def _fmix(h: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    h = h ^ (h >> U64(33))
    h = h * U64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> U64(33))
    h = h * U64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> U64(33))


class _Runs:
    """Normalises the non-ASCII runs of UTF-8 text, caching each distinct run (names, quotes and scripts repeat)."""

    def __init__(self, limit: int = 200_000) -> None:
        self.cache: dict[bytes, bytes] = {}
        self.limit = limit

    def one(self, run: bytes) -> bytes:
        """Return one run NFKC-normalised and case-folded, non-ASCII characters that are not alphanumeric as spaces."""
        out = self.cache.get(run)
        if out is None:
            folded = unicodedata.normalize("NFKC", run.decode("utf-8")).casefold()
            # Non-ASCII letters and digits stay (as the reference's [\W_] keeps them); the rest is a space.
            out = "".join(c if c.isascii() or c.isalnum() or c == _SEP else " " for c in folded).encode("utf-8")
            if len(self.cache) >= self.limit:
                self.cache.clear()
            self.cache[run] = out
        return out

    def normalise(self, text: str) -> bytes:
        """Return ``text`` as UTF-8 with every non-ASCII run normalised (ASCII is left to the byte table)."""
        raw = text.encode("utf-8")
        high = np.zeros(len(raw) + 2, dtype=np.int8)
        np.greater_equal(np.frombuffer(raw, dtype=np.uint8), 0x80, out=high[1:-1].view(np.bool_))
        edges = np.diff(high)
        # Each run starts one byte early: the ASCII character before it may compose with it
        # (e + U+0301 -> é), and no composition reaches further back into ASCII.
        begins = np.maximum(np.flatnonzero(edges == 1) - 1, 0).tolist()
        ends = np.flatnonzero(edges == -1).tolist()
        pieces: list[bytes] = []
        last = 0
        for begin, end in zip(begins, ends, strict=True):
            begin = max(begin, last)
            pieces.append(raw[last:begin])
            pieces.append(self.one(raw[begin:end]))
            last = end
        pieces.append(raw[last:])
        return b"".join(pieces)


_RUNS = _Runs()
_SEP_BYTES = _SEP.encode("utf-8")


def prepare_batch(texts: Sequence[str]) -> tuple[bytes, npt.NDArray[np.int64]]:
    """Return the batch as one normalised byte buffer (documents joined by a space) and each document's start.

    The result splits into exactly the words :func:`airlock.contamination.scheme.words` gives
    each document (a test holds the two to each other).
    """
    joined = " ".join(texts)
    if joined.isascii():
        lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
        buf = joined.encode("ascii").translate(_TABLE)
    else:
        # Only the documents that are not ASCII (str.isascii is O(1)) take the Unicode path, together.
        odd = [i for i, t in enumerate(texts) if not t.isascii()]
        text = _SEP.join(texts[i].replace(_SEP, " ") for i in odd)
        parts: list[bytes] = [t.encode("ascii") if t.isascii() else b"" for t in texts]
        for i, part in zip(odd, _RUNS.normalise(text).split(_SEP_BYTES), strict=True):
            parts[i] = part
        lengths = np.fromiter(map(len, parts), dtype=np.int64, count=len(parts))
        buf = b" ".join(parts).translate(_TABLE)
    starts = np.zeros(len(texts), dtype=np.int64)
    if len(texts) > 1:
        np.cumsum(lengths[:-1] + 1, out=starts[1:])
    return buf, starts


def _word_hashes(buf: bytes, starts: npt.NDArray[np.int64], ends: npt.NDArray[np.int64]) -> npt.NDArray[np.uint64]:
    """Return a 64-bit hash of every word ``buf[start:end]``: its bytes read 8 at a time, and its length."""
    padded = buf + bytes(8)
    # Overlapping unaligned 8-byte reads at every offset: word bytes 8k..8k+7 are one gather.
    at = np.ndarray(shape=(len(buf) + 1,), dtype="<u8", buffer=padded, strides=(1,))
    lengths = ends - starts
    h = lengths.astype(np.uint64) * U64(_CHUNK_MULS[-1])
    h += (at[starts] & _KEEP[np.minimum(lengths, 8)]) * U64(_CHUNK_MULS[0])
    idx = np.flatnonzero(lengths > 8)  # most words end in the first chunk: only longer ones go on
    for k in range(1, len(_CHUNK_MULS) - 1):
        if idx.size == 0:
            break
        rest = lengths[idx] - 8 * k
        h[idx] += (at[starts[idx] + 8 * k] & _KEEP[np.minimum(rest, 8)]) * U64(_CHUNK_MULS[k])
        idx = idx[rest > 8]
    for i in idx.tolist():  # longer than the chunks cover: rare (encoded blobs)
        tail = hashlib.blake2b(buf[int(starts[i]) : int(ends[i])], digest_size=8).digest()
        h[i] ^= U64(int.from_bytes(tail, "little"))
    # No finaliser: the odd multipliers already carry every byte into the top bits the cache slots use.
    return h


def keyed_words(salt: bytes, words: Sequence[bytes]) -> npt.NDArray[np.uint64]:
    """Return HMAC-SHA256(salt, word)[:8] (little-endian) for each word, from precomputed pad states."""
    key = hashlib.sha256(salt).digest() if len(salt) > 64 else salt
    key = key.ljust(64, b"\0")
    inner0 = hashlib.sha256(bytes(b ^ 0x36 for b in key))
    outer0 = hashlib.sha256(bytes(b ^ 0x5C for b in key))
    out = bytearray()
    for word in words:
        inner = inner0.copy()
        inner.update(word)
        outer = outer0.copy()
        outer.update(inner.digest())
        out += outer.digest()[:8]
    return np.frombuffer(bytes(out), dtype="<u8").astype(np.uint64)


class _Vocabulary:
    """The distinct words seen in one check, each with a dense id (a direct-mapped cache before a dict)."""

    def __init__(self) -> None:
        self.slot_hash = np.zeros(1 << _SLOT_BITS, dtype=np.uint64)
        self.slot_id = np.full(1 << _SLOT_BITS, -1, dtype=np.int32)
        self.by_hash: dict[int, int] = {}
        self.words: list[bytes] = []

    def ids(
        self, hashes: npt.NDArray[np.uint64], buf: bytes, starts: npt.NDArray[np.int64], ends: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.int64]:
        """Return the id of every word, adding the new ones."""
        slot = (hashes >> U64(64 - _SLOT_BITS)).astype(np.int64)
        ids = self.slot_id[slot].astype(np.int64)
        miss = np.flatnonzero((self.slot_hash[slot] != hashes) | (ids < 0))
        if miss.size == 0:
            return ids
        uniq, first, inverse = np.unique(hashes[miss], return_index=True, return_inverse=True)
        get = self.by_hash.get
        uniq_ids = np.array([get(h, -1) for h in uniq.tolist()], dtype=np.int64)
        new = np.flatnonzero(uniq_ids < 0)
        if new.size:
            base = len(self.words)
            uniq_ids[new] = np.arange(base, base + new.size)
            at = miss[first[new]]
            self.words.extend([buf[s:e] for s, e in zip(starts[at].tolist(), ends[at].tolist(), strict=True)])
            self.by_hash.update(zip(uniq[new].tolist(), uniq_ids[new].tolist(), strict=True))
        ids[miss] = uniq_ids[inverse.reshape(-1)]
        # Fill empty slots so the next batch finds these words without Python.
        uslots = (uniq >> U64(64 - _SLOT_BITS)).astype(np.int64)
        empty = self.slot_id[uslots] < 0
        self.slot_hash[uslots[empty]] = uniq[empty]
        self.slot_id[uslots[empty]] = uniq_ids[empty]
        return ids


class _Registration:
    """One registered fingerprint, indexed for lookups: distinct hashes → the items holding them."""

    def __init__(self, registration_id: str, fingerprint: Fingerprint) -> None:
        self.id = registration_id
        self.salt = fingerprint.salt
        self.scheme: Scheme = fingerprint.scheme
        self.item_ids = [item.id for item in fingerprint.items]
        sizes = [item.shingles.size for item in fingerprint.items]
        self.sizes = np.array(sizes, dtype=np.int64)
        self.needed = np.minimum(self.sizes, self.scheme.min_shingles)
        flat = np.concatenate([np.zeros(0, np.uint32), *(item.shingles for item in fingerprint.items)]).astype(
            np.uint64
        )
        owner = np.repeat(np.arange(len(sizes), dtype=np.int64), sizes)
        order = np.argsort(flat, kind="stable")
        flat, owner = flat[order], owner[order]
        self.hashes, first = np.unique(flat, return_index=True)
        self.ptr = np.append(first, flat.size).astype(np.int64)
        self.owner = owner
        bitmap = np.zeros(1 << (_BITMAP_BITS - 3), dtype=np.uint8)
        top = (self.hashes >> U64(32 - _BITMAP_BITS)).astype(np.int64)
        np.bitwise_or.at(bitmap, top >> 3, (1 << (top & 7)).astype(np.uint8))
        self.bitmap = bitmap
        self.keys = np.zeros(0, dtype=np.uint64)

    def word_keys(self, vocabulary: _Vocabulary) -> npt.NDArray[np.uint64]:
        """Return every vocabulary word's keyed value under this registration's salt (new words hashed now)."""
        have = self.keys.size
        if have < len(vocabulary.words):
            self.keys = np.concatenate([self.keys, keyed_words(self.salt, vocabulary.words[have:])])
        return self.keys


@dataclass(frozen=True)
class Match:
    """A corpus document that holds enough of one registered item's shingles."""

    document: str
    registration: str
    item: str
    fraction: float
    shingles: int
    of: int


class Checker:
    """Checks corpus batches against a set of registrations; one vocabulary is shared across them."""

    def __init__(self, registrations: Sequence[tuple[str, Fingerprint]]) -> None:
        self.registrations = [_Registration(rid, fp) for rid, fp in registrations]
        self.vocabulary = _Vocabulary()
        self.documents = 0
        self.words = 0

    def check(self, documents: Sequence[tuple[str, str]]) -> list[Match]:
        """Return every (document, item) match in one batch of ``(document id, text)``."""
        self.documents += len(documents)
        if not documents or not self.registrations:
            return []
        if len(self.vocabulary.words) > _MAX_VOCABULARY:
            # A web-scale corpus never stops meeting new tokens: forget them all rather than grow without
            # bound (words seen again are hashed again; matches do not change).
            self.vocabulary = _Vocabulary()
            for reg in self.registrations:
                reg.keys = np.zeros(0, dtype=np.uint64)
        buf, doc_starts = prepare_batch([text for _, text in documents])
        b = np.frombuffer(buf, dtype=np.uint8)
        is_word = np.zeros(b.size + 2, dtype=np.int8)
        np.not_equal(b, 32, out=is_word[1:-1])
        # Edges alternate: a word's start, then its end (one pass over the batch, not two).
        edges = np.flatnonzero(np.diff(is_word))
        starts, ends = edges[0::2], edges[1::2]
        self.words += starts.size
        if starts.size == 0:
            return []
        ids = self.vocabulary.ids(_word_hashes(buf, starts, ends), buf, starts, ends)
        matches: list[Match] = []
        for reg in self.registrations:
            matches.extend(self._check_one(reg, documents, ids, starts, doc_starts))
        return matches

    def _check_one(
        self,
        reg: _Registration,
        documents: Sequence[tuple[str, str]],
        ids: npt.NDArray[np.int64],
        starts: npt.NDArray[np.int64],
        doc_starts: npt.NDArray[np.int64],
    ) -> list[Match]:
        n = reg.scheme.ngram
        count = ids.size - n + 1
        if count <= 0 or reg.hashes.size == 0:
            return []
        keys = reg.word_keys(self.vocabulary)[ids]
        acc = keys[:count] * U64(MIX[0])
        for j in range(1, n):
            acc += keys[j : j + count] * U64(MIX[j])
        h = _fmix(acc) >> U64(32)
        top = (h >> U64(32 - _BITMAP_BITS)).astype(np.int64)
        maybe = (reg.bitmap[top >> 3] >> (top & 7).astype(np.uint8)) & 1
        cand = np.flatnonzero(maybe)
        if cand.size == 0:
            return []
        pos = np.minimum(np.searchsorted(reg.hashes, h[cand]), reg.hashes.size - 1)
        hit = reg.hashes[pos] == h[cand]
        cand, pos = cand[hit], pos[hit]
        # A shingle counts only inside one document: its first and last word in the same one.
        docs = np.searchsorted(doc_starts, starts[cand], side="right") - 1
        same = docs == np.searchsorted(doc_starts, starts[cand + n - 1], side="right") - 1
        docs, pos = docs[same], pos[same]
        if docs.size == 0:
            return []
        pair = np.unique(docs * np.int64(reg.hashes.size) + pos)  # each shingle once per document
        docs, pos = pair // reg.hashes.size, pair % reg.hashes.size
        widths = reg.ptr[pos + 1] - reg.ptr[pos]
        rep_docs = np.repeat(docs, widths)
        offsets = np.repeat(reg.ptr[pos] - np.cumsum(widths) + widths, widths) + np.arange(widths.sum())
        items = reg.owner[offsets]
        key, counts = np.unique(rep_docs * np.int64(len(reg.item_ids)) + items, return_counts=True)
        docs, items = key // len(reg.item_ids), key % len(reg.item_ids)
        fraction = counts / reg.sizes[items]
        ok = np.flatnonzero((fraction >= reg.scheme.threshold) & (counts >= reg.needed[items]))
        return [
            Match(
                documents[int(docs[i])][0],
                reg.id,
                reg.item_ids[int(items[i])],
                round(float(fraction[i]), 4),
                int(counts[i]),
                int(reg.sizes[items[i]]),
            )
            for i in ok
        ]


_WORKER: list[Checker] = []


def _start_worker(registrations: Sequence[tuple[str, Fingerprint]]) -> None:
    _WORKER.append(Checker(registrations))


def _check_in_worker(batch: list[tuple[str, str]]) -> tuple[list[Match], int]:
    checker = _WORKER[0]
    before = checker.words
    return checker.check(batch), checker.words - before


def check_batches(
    registrations: Sequence[tuple[str, Fingerprint]], batches: Iterable[list[tuple[str, str]]], workers: int = 1
) -> Iterator[tuple[list[Match], int]]:
    """Yield ``(matches, words)`` per batch, in order; with ``workers`` > 1, batches are checked in that many processes.

    Each process keeps its own vocabulary; the caller's process only reads and hands out batches
    (at most two per process in flight, so memory stays bounded).
    """
    if workers <= 1:
        checker = Checker(registrations)
        for batch in batches:
            before = checker.words
            yield checker.check(batch), checker.words - before
        return
    context = multiprocessing.get_context("spawn")  # no inherited database handles or threads
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=(registrations,)) as pool:
        pending: deque[Future[tuple[list[Match], int]]] = deque()
        for batch in batches:
            pending.append(pool.submit(_check_in_worker, batch))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
