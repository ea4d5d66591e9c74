"""RFC 6962/9162 Merkle tree math: hashing, proof shapes and proof verification.

Trees are identified by leaf ranges. A stored *node* ``(level, idx)`` is the hash of the complete,
aligned subtree over leaves ``[idx * 2**level, (idx + 1) * 2**level)``; every range that appears in
an RFC 9162 proof decomposes into O(log n) such nodes, so proofs never rehash leaves.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

Node = tuple[int, int]
Range = tuple[int, int]

EMPTY_ROOT = hashlib.sha256(b"").digest()
HASH_SIZE = 32


class ProofError(ValueError):
    """A proof, tree size or hash failed verification."""


def leaf_hash(data: bytes) -> bytes:
    """Return ``SHA-256(0x00 || data)``."""
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """Return ``SHA-256(0x01 || left || right)``."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """Return the largest power of two strictly below ``n`` (``n > 1``)."""
    return 1 << ((n - 1).bit_length() - 1)


def range_nodes(lo: int, hi: int) -> list[Node]:
    """Decompose leaves ``[lo, hi)`` into maximal aligned complete subtrees, left to right."""
    nodes: list[Node] = []
    while lo < hi:
        level = (hi - lo).bit_length() - 1
        # A node must start at a multiple of its width.
        while lo % (1 << level):
            level -= 1
        nodes.append((level, lo >> level))
        lo += 1 << level
    return nodes


def fold(hashes: Sequence[bytes]) -> bytes:
    """Return the RFC 9162 hash of a range from its decomposition (right fold); empty → SHA-256("")."""
    if not hashes:
        return EMPTY_ROOT
    acc = hashes[-1]
    for h in reversed(hashes[:-1]):
        acc = node_hash(h, acc)
    return acc


def inclusion_ranges(index: int, size: int) -> list[Range]:
    """Return the leaf ranges whose hashes form PATH(index, D[size]) (RFC 9162 §2.1.3.1), in order."""
    if not 0 <= index < size:
        raise ProofError(f"leaf index {index} is outside a tree of size {size}")
    path: list[Range] = []
    lo, hi = 0, size
    while hi - lo > 1:
        k = _split(hi - lo)
        if index < lo + k:
            path.append((lo + k, hi))
            hi = lo + k
        else:
            path.append((lo, lo + k))
            lo += k
    path.reverse()
    return path


def consistency_ranges(old: int, new: int) -> list[Range]:
    """Return the leaf ranges whose hashes form PROOF(old, D[new]) (RFC 9162 §2.1.4.1), in order."""
    if not 0 < old <= new:
        raise ProofError(f"no consistency proof from size {old} to size {new}")
    path: list[Range] = []
    lo, hi, m, complete = 0, new, old, True
    while m != hi - lo:
        k = _split(hi - lo)
        if m <= k:
            path.append((lo + k, hi))
            hi = lo + k
        else:
            path.append((lo, lo + k))
            lo += k
            m -= k
            complete = False
    if not complete:
        path.append((lo, hi))
    path.reverse()
    return path


def resolve(ranges: Sequence[Range], lookup: Callable[[Sequence[Node]], dict[Node, bytes]]) -> list[bytes]:
    """Hash each range from stored nodes fetched in one ``lookup`` call."""
    parts = [range_nodes(lo, hi) for lo, hi in ranges]
    found = lookup(sorted({n for p in parts for n in p}))
    try:
        return [fold([found[n] for n in p]) for p in parts]
    except KeyError as exc:
        raise ProofError(f"tree node {exc.args[0]} is missing from storage") from None


def _check_hash(value: bytes, what: str) -> None:
    if len(value) != HASH_SIZE:
        raise ProofError(f"{what} is {len(value)} bytes, not {HASH_SIZE}")


def verify_inclusion(leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes) -> None:
    """Verify an inclusion proof (RFC 9162 §2.1.3.2); raise :class:`ProofError` on any mismatch."""
    _check_hash(leaf, "leaf hash")
    _check_hash(root, "root hash")
    for p in proof:
        _check_hash(p, "proof hash")
    if not 0 <= index < size:
        raise ProofError(f"leaf index {index} is outside a tree of size {size}")
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            raise ProofError("inclusion proof is too long")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("inclusion proof is too short")
    if r != root:
        raise ProofError("inclusion proof does not lead to the root")


def verify_consistency(old: int, new: int, proof: Sequence[bytes], old_root: bytes, new_root: bytes) -> None:
    """Verify a consistency proof (RFC 9162 §2.1.4.2); raise :class:`ProofError` on any mismatch."""
    if old > new:
        raise ProofError(f"old size {old} is larger than new size {new}")
    if old == 0:
        # RFC 9162 defines proofs only for 0 < old; every tree extends the empty one, so it proves nothing.
        raise ProofError("a consistency proof from the empty tree is meaningless")
    if old == new:
        if proof:
            raise ProofError("sizes are equal but the proof is not empty")
        if old_root != new_root:
            raise ProofError("sizes are equal but the roots differ")
        return
    if not proof:
        raise ProofError("consistency proof is empty")
    _check_hash(old_root, "old root")
    _check_hash(new_root, "new root")
    for p in proof:
        _check_hash(p, "proof hash")
    path = list(proof)
    if old & (old - 1) == 0:
        path.insert(0, old_root)
    fn, sn = old - 1, new - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ProofError("consistency proof is too long")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("consistency proof is too short")
    if fr != old_root:
        raise ProofError("consistency proof does not lead to the old root")
    if sr != new_root:
        raise ProofError("consistency proof does not lead to the new root")


class MemoryTree:
    """An in-memory tree of leaf hashes (the offline verifier's and tests' reference)."""

    def __init__(self) -> None:
        self.levels: list[list[bytes]] = [[]]

    def __len__(self) -> int:
        return len(self.levels[0])

    def append(self, leaf: bytes) -> None:
        """Append one leaf hash, completing parent nodes as they fill."""
        level, h = 0, leaf
        while True:
            row = self.levels[level]
            row.append(h)
            if len(row) % 2:
                return
            h = node_hash(row[-2], row[-1])
            level += 1
            if level == len(self.levels):
                self.levels.append([])

    def nodes(self, wanted: Sequence[Node]) -> dict[Node, bytes]:
        """Return stored complete-subtree hashes by ``(level, idx)``."""
        return {(lv, i): self.levels[lv][i] for lv, i in wanted if lv < len(self.levels) and i < len(self.levels[lv])}

    def root(self, size: int | None = None) -> bytes:
        """Return the root of the first ``size`` leaves (default all)."""
        size = len(self) if size is None else size
        return resolve([(0, size)], self.nodes)[0] if size else EMPTY_ROOT

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        """Return PATH(index, D[size])."""
        return resolve(inclusion_ranges(index, size), self.nodes)

    def consistency_proof(self, old: int, new: int) -> list[bytes]:
        """Return PROOF(old, D[new])."""
        return resolve(consistency_ranges(old, new), self.nodes)
