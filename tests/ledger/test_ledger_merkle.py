"""RFC 9162 Merkle math: the shared transparency-dev vectors, and proofs from our own trees."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from airlock.ledger._merkle import (
    MemoryTree,
    ProofError,
    leaf_hash,
    node_hash,
    verify_consistency,
    verify_inclusion,
)

VECTORS = Path(__file__).resolve().parents[2] / ".." / "shared" / "testdata" / "merkle-rfc9162"


def _cases(kind: str) -> list[Any]:
    folder = VECTORS / kind
    if not folder.is_dir():
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"shared test vectors absent: {folder}"))]
    files = sorted(folder.rglob("*.json"))
    return [pytest.param(json.loads(f.read_text()), id=str(f.relative_to(folder))) for f in files]


def _b64(value: str) -> bytes:
    return base64.b64decode(value)


@pytest.mark.parametrize("case", _cases("inclusion"))
def test_inclusion_vectors(case: dict[str, Any]) -> None:
    """Accept exactly the inclusion cases with ``wantErr: false``."""
    args = (_b64(case["leafHash"]), case["leafIdx"], case["treeSize"], [_b64(p) for p in case["proof"] or []])
    if case["wantErr"]:
        with pytest.raises(ProofError):
            verify_inclusion(*args, _b64(case["root"]))
    else:
        verify_inclusion(*args, _b64(case["root"]))


@pytest.mark.parametrize("case", _cases("consistency"))
def test_consistency_vectors(case: dict[str, Any]) -> None:
    """Accept exactly the consistency cases with ``wantErr: false``."""
    args = (case["size1"], case["size2"], [_b64(p) for p in case["proof"] or []], _b64(case["root1"]))
    if case["wantErr"]:
        with pytest.raises(ProofError):
            verify_consistency(*args, _b64(case["root2"]))
    else:
        verify_consistency(*args, _b64(case["root2"]))


def test_vectors_cover_both_outcomes() -> None:
    """The vector set is the one we expect (guards against an empty or truncated folder)."""
    if not VECTORS.is_dir():
        pytest.skip(f"shared test vectors absent: {VECTORS}")
    cases = [json.loads(f.read_text()) for f in VECTORS.rglob("*.json")]
    assert len(cases) > 150
    assert {c["wantErr"] for c in cases} == {True, False}


def _naive_root(leaves: list[bytes]) -> bytes:
    """MTH straight from RFC 9162 §2.1.1, recursively."""
    if len(leaves) == 1:
        return leaves[0]
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    return node_hash(_naive_root(leaves[:k]), _naive_root(leaves[k:]))


def test_every_proof_of_small_trees_verifies() -> None:
    """For all sizes up to 40, all inclusion and consistency proofs verify and roots match the RFC definition."""
    tree = MemoryTree()
    leaves = [leaf_hash(f"entry {i}".encode()) for i in range(40)]
    for leaf in leaves:
        tree.append(leaf)
    for size in range(1, 41):
        root = tree.root(size)
        assert root == _naive_root(leaves[:size])
        for index in range(size):
            verify_inclusion(leaves[index], index, size, tree.inclusion_proof(index, size), root)
        for old in range(1, size + 1):
            verify_consistency(old, size, tree.consistency_proof(old, size), tree.root(old), root)


def test_wrong_leaf_and_wrong_root_fail() -> None:
    """A proof for one leaf does not verify another leaf, nor against another root."""
    tree = MemoryTree()
    for i in range(13):
        tree.append(leaf_hash(bytes([i])))
    proof = tree.inclusion_proof(5, 13)
    with pytest.raises(ProofError):
        verify_inclusion(leaf_hash(b"\x06"), 5, 13, proof, tree.root())
    with pytest.raises(ProofError):
        verify_inclusion(leaf_hash(b"\x05"), 5, 13, proof, tree.root(12))
    with pytest.raises(ProofError):
        verify_consistency(7, 13, tree.consistency_proof(7, 13), tree.root(6), tree.root())
