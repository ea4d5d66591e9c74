"""The output policy: what of a job's result may leave, checked before anything is stored.

A runner's result passes size caps (per job, and what is left of the grant's result quota), a
check that no returned array equals a slice of the weights (:mod:`airlock.interp.leak_index`),
and review by the lab when it is large. What passes is split into a JSON document and NPZ
arrays, with one SHA-256 over both that the evaluator recomputes from what the API returns.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from airlock.interp import _wire, client
from airlock.interp.errors import InterpJobError
from airlock.interp.leak_index import ParamIndex

Array = np.ndarray[Any, Any]


@dataclass(frozen=True)
class OutputPolicy:
    """What a job may release: size caps and the weights check."""

    max_result_bytes: int
    """Largest result (JSON + arrays) of one job."""
    grant_bytes_left: int | None
    """What remains of the grant's result-bytes quota (None: no quota)."""
    review_over_bytes: int
    """Results larger than this wait for a lab reviewer."""


@dataclass
class Released:
    """A result that passed the output policy: its JSON document and NPZ bytes."""

    document: dict[str, Any]
    npz: bytes
    result_bytes: int
    arrays: list[dict[str, Any]]
    needs_review: bool
    review_reasons: list[str]
    sha256: str = ""
    """The digest of the whole result, JSON values and arrays (:func:`airlock.interp.client.result_sha256`)."""


def apply_policy(value: Any, policy: OutputPolicy, index: ParamIndex | None) -> Released:
    """Split a result into JSON and arrays, enforce the caps and the weights check (or raise)."""
    arrays: dict[str, Array] = {}

    def strip(node: Any, path: str, depth: int = 0) -> Any:
        if depth > _wire.MAX_DEPTH:
            raise InterpJobError(
                f"the result is nested deeper than {_wire.MAX_DEPTH} levels (at {path[:200]})", code="invalid_result"
            )
        if isinstance(node, np.ndarray):
            name = f"a{len(arrays)}"
            arrays[name] = node
            return {"__array__": name}
        if isinstance(node, dict):
            if "__array__" in node:
                # Reserved for array references: a literal one would be indistinguishable from an array.
                raise InterpJobError(f"the key '__array__' is reserved (at {path[:200]})", code="invalid_result")
            return {key: strip(item, f"{path}.{key}", depth + 1) for key, item in node.items()}
        if isinstance(node, list):
            return [strip(item, f"{path}[{i}]", depth + 1) for i, item in enumerate(node)]
        if isinstance(node, float) and not math.isfinite(node):
            return None if math.isnan(node) else ("inf" if node > 0 else "-inf")
        return node

    document = strip(value, "result")
    try:
        # One rule on both sides: the evaluator recomputes this digest from what the API returns.
        digest = client.result_sha256(document, arrays)
    except ValueError as exc:  # lone surrogates, integers past 2^53 - 1: not exactly representable JSON
        raise InterpJobError(f"the result is not exactly representable as JSON: {exc}", code="invalid_result") from None
    text = json.dumps(document, separators=(",", ":"))
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)  # type: ignore[arg-type]
    npz = buffer.getvalue()
    size = len(text.encode()) + sum(int(a.nbytes) for a in arrays.values())
    if size > policy.max_result_bytes:
        raise InterpJobError(
            f"the result is {size} bytes; the per-job cap is {policy.max_result_bytes} bytes", code="result_too_large"
        )
    if policy.grant_bytes_left is not None and size > policy.grant_bytes_left:
        raise InterpJobError(
            f"the result is {size} bytes but only {max(policy.grant_bytes_left, 0)} bytes of the grant's "
            "result quota are left",
            code="insufficient_quota",
        )
    if index is not None:
        for name, array in arrays.items():
            found = index.find(array)
            if found:
                raise InterpJobError(
                    f"the result was withheld: array {name} contains {found}", code="weights_in_result"
                )
    reasons = []
    if size > policy.review_over_bytes:
        reasons.append(f"result of {size} bytes exceeds the review threshold of {policy.review_over_bytes} bytes")
    return Released(
        document=document,
        npz=npz,
        result_bytes=size,
        arrays=[{"name": n, "dtype": a.dtype.name, "shape": list(a.shape)} for n, a in arrays.items()],
        needs_review=bool(reasons),
        review_reasons=reasons,
        sha256=digest,
    )
