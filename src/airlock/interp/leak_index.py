"""The weights-leak index: finds copies of the model's parameters in what a job returns.

A result that passes through the output policy (:mod:`airlock.interp.output_policy`) is checked
here: no returned array may hold a run of float32 values equal to a slice of the weights.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import numpy as np

from airlock.interp.workers import ModelWorker, base_model

Array = np.ndarray[Any, Any]

_WINDOW = 4  # values per fingerprint
_STRIDE = 64  # fingerprints are taken every _STRIDE values along each row and column
MIN_MATCH = 32  # consecutive equal values that count as a copy of the weights
_MIX = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93], dtype=np.uint64)


def _fingerprints(bits: Array) -> Array:
    """Hash each run of ``_WINDOW`` consecutive uint32 values of the last axis (sliding)."""
    x = bits.astype(np.uint64)
    n = x.shape[-1] - _WINDOW + 1
    out = np.zeros((*x.shape[:-1], max(n, 0)), dtype=np.uint64)
    for k in range(_WINDOW):
        out ^= x[..., k : k + n] * _MIX[k]  # uint64 arithmetic wraps by design
    return out


class ParamIndex:
    """Finds copies of the weights in outgoing arrays: runs of equal float32 values along a row or column.

    Every parameter is indexed as lines (rows, and columns of matrices), with a fingerprint
    every ``_STRIDE`` values; an outgoing array is fingerprinted at every offset, and hits are
    verified value by value. Any copied run of at least ``_STRIDE + _WINDOW`` values (or a
    whole line, when shorter) is found. It does not find transformed weights (scaled, summed,
    rounded to a lower precision): the size cap and the review queue are the backstop there.
    The index holds fingerprints and views of the parameters, never copies of them.
    """

    def __init__(self, named: list[tuple[str, Array]]) -> None:
        self.params: list[tuple[str, Array]] = []
        keys: list[Array] = []
        where: list[Array] = []
        for name, values in named:
            matrix = np.asarray(values, dtype=np.float32)
            matrix = matrix.reshape(-1, matrix.shape[-1]) if matrix.ndim else matrix.reshape(1, 1)
            param_id = len(self.params)
            self.params.append((name, matrix))
            orientations = [0, 1] if np.ndim(values) == 2 else [0]
            for axis in orientations:
                length = matrix.shape[1] if axis == 0 else matrix.shape[0]
                for start in range(0, max(length - _WINDOW + 1, 0), _STRIDE):
                    # [lines, _WINDOW]: the window at ``start`` of every row (axis 0) or column (axis 1).
                    part = matrix[:, start : start + _WINDOW] if axis == 0 else matrix[start : start + _WINDOW, :].T
                    windows = np.ascontiguousarray(part)
                    # Constant windows (zeros, ones of a norm) carry no information and match anything.
                    varied = np.nonzero((windows != windows[:, :1]).any(axis=1))[0]
                    keys.append(_fingerprints(windows.view(np.uint32))[varied, 0])
                    rows = np.empty((len(varied), 4), dtype=np.int32)
                    rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3] = param_id, axis, varied, start
                    where.append(rows)
        all_keys = np.concatenate(keys) if keys else np.zeros(0, dtype=np.uint64)
        order = np.argsort(all_keys, kind="stable")
        self.keys = all_keys[order]
        self.where = (np.concatenate(where) if where else np.zeros((0, 4), dtype=np.int32))[order]

    @classmethod
    def of_model(cls, model: Any) -> ParamIndex:
        """Index every floating-point parameter of ``model`` (each tensor once, tied ones included)."""
        seen: set[int] = set()
        named = []
        for name, param in base_model(model).named_parameters():
            if not param.dtype.is_floating_point or param.data_ptr() in seen:
                continue
            seen.add(param.data_ptr())
            named.append((name, param.detach().float().cpu().numpy()))
        return cls(named)

    def find(self, array: Array) -> str | None:
        """Return a description of a weights copy inside ``array``, or None."""
        if array.dtype.kind != "f" or array.size < _WINDOW or not len(self.keys):
            return None
        flat = np.ascontiguousarray(array, dtype=np.float32).reshape(-1)
        prints = _fingerprints(flat.view(np.uint32))
        slots = np.searchsorted(self.keys, prints)
        slots[slots == len(self.keys)] = 0
        for offset in np.nonzero(self.keys[slots] == prints)[0]:
            lo = np.searchsorted(self.keys, prints[offset], side="left")
            hi = np.searchsorted(self.keys, prints[offset], side="right")
            for param_id, axis, index, start in self.where[lo:hi]:
                name, matrix = self.params[int(param_id)]
                line = matrix[int(index)] if axis == 0 else matrix[:, int(index)]
                run = _match_length(flat, int(offset), line, int(start))
                if run >= min(MIN_MATCH, len(line)):
                    kind = "row" if axis == 0 else "column"
                    return f"{run} values equal to {kind} {int(index)} of {name}"
        return None


def _match_length(flat: Array, at: int, line: Array, start: int) -> int:
    """Length of the run of equal values through ``flat[at]`` ≡ ``line[start]``."""
    back = min(at, start)
    ahead = min(len(flat) - at, len(line) - start)
    a = flat[at - back : at + ahead].view(np.uint32)
    b = np.ascontiguousarray(line[start - back : start + ahead]).view(np.uint32)
    equal = a == b
    if not equal[back]:
        return 0
    left = back - (np.nonzero(~equal[:back])[0].max() + 1 if (~equal[:back]).any() else 0)
    after = equal[back:]
    right = int(np.argmin(after)) if not after.all() else len(after)
    return int(left + right)


_INDEXES: weakref.WeakKeyDictionary[Any, ParamIndex] = weakref.WeakKeyDictionary()
_INDEX_LOCK = threading.Lock()


def param_index(worker: ModelWorker) -> ParamIndex:
    """Return the (cached) weights index of ``worker``'s model, building it on the model thread once."""

    def build(model: Any, _tokenizer: Any) -> ParamIndex:
        base = base_model(model)
        with _INDEX_LOCK:
            index = _INDEXES.get(base)
            if index is None:
                index = _INDEXES[base] = ParamIndex.of_model(base)
        return index

    result: ParamIndex = worker.submit(build).result()
    return result
