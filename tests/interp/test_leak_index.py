"""The weights-leak index: copies of the weights in outgoing arrays are found, anything else is not."""

from __future__ import annotations

import numpy as np

from airlock.interp.leak_index import MIN_MATCH, ParamIndex, param_index
from airlock.interp.workers import ThreadWorker


def test_param_index_finds_copies_and_nothing_else(tiny_worker: ThreadWorker) -> None:
    index = param_index(tiny_worker)
    model = tiny_worker.model
    up = model.model.layers[0].mlp.up_proj.weight.detach().numpy()  # [128, 64]
    embed = model.model.embed_tokens.weight.detach().numpy()
    assert index.find(up[5]) and index.find(up[:, 9].copy())  # a row, a column
    assert index.find(embed[1234].astype(np.float64))  # a (tied) embedding row, widened
    assert index.find(np.concatenate([np.ones(7, np.float32), embed[99], np.zeros(3, np.float32)]))  # embedded
    assert index.find(up[3:5].reshape(-1)[10:110])  # a run spanning two rows
    assert index.find(up[5] * 2.0) is None and index.find(up[5].astype(np.float16)) is None
    rng = np.random.default_rng(1)
    assert index.find(rng.standard_normal((100, 64)).astype(np.float32)) is None
    assert index.find(np.zeros(1000, np.float32)) is None and index.find(np.arange(10)) is None
    # Built once per model, on the model's thread, then reused by every job.
    assert param_index(tiny_worker) is index


def test_a_copy_counts_from_min_match_values_or_a_whole_short_line() -> None:
    rng = np.random.default_rng(7)
    weight = rng.standard_normal((4, 200)).astype(np.float32)
    bias = rng.standard_normal(8).astype(np.float32)
    index = ParamIndex([("w", weight), ("b", bias)])
    # A run through a fingerprint (one every 64 values of a row) is a copy from MIN_MATCH values on.
    assert index.find(weight[2, 64 : 64 + MIN_MATCH]) == f"{MIN_MATCH} values equal to row 2 of w"
    assert index.find(weight[2, 64 : 64 + MIN_MATCH - 1]) is None
    # A line shorter than MIN_MATCH (a bias, a norm's scale) counts only when copied whole.
    assert index.find(bias) == "8 values equal to row 0 of b"
    assert index.find(bias[:7]) is None
