"""The output policy: the result's JSON and arrays, its caps per job and per grant, review, and the weights check."""

from __future__ import annotations

import numpy as np
import pytest

from airlock.interp.errors import InterpJobError
from airlock.interp.leak_index import ParamIndex
from airlock.interp.output_policy import OutputPolicy, apply_policy


def test_output_policy_sizes_quota_and_review() -> None:
    value = {"x": np.ones(100, np.float32), "nested": [{"y": np.zeros((2, 3), np.int64)}], "nan": float("nan")}
    released = apply_policy(value, OutputPolicy(10_000, None, 500), None)
    assert released.document == {"x": {"__array__": "a0"}, "nested": [{"y": {"__array__": "a1"}}], "nan": None}
    assert released.result_bytes > 448 and released.needs_review
    assert [a["shape"] for a in released.arrays] == [[100], [2, 3]]
    assert not apply_policy(value, OutputPolicy(10_000, None, 5_000), None).needs_review
    with pytest.raises(InterpJobError, match="only 100 bytes of the grant's result quota") as caught:
        apply_policy(value, OutputPolicy(10_000, 100, 5_000), None)
    assert caught.value.code == "insufficient_quota"


def test_the_per_job_cap_and_the_weights_check_withhold_the_result() -> None:
    weight = np.random.default_rng(3).standard_normal((8, 64)).astype(np.float32)
    index = ParamIndex([("model.layers.0.mlp.up_proj.weight", weight)])
    with pytest.raises(InterpJobError, match="the per-job cap is 1000 bytes") as caught:
        apply_policy({"x": np.ones(1000, np.float32)}, OutputPolicy(1000, None, 1 << 20), index)
    assert caught.value.code == "result_too_large"
    # A row of the weights among other values is found; the same values scaled are not.
    leak = {"ok": np.ones(4, np.float32), "probe": np.concatenate([np.zeros(5, np.float32), weight[0]])}
    with pytest.raises(InterpJobError, match=r"withheld: array a1 contains 64 values equal to row 0 of") as caught:
        apply_policy(leak, OutputPolicy(1 << 20, None, 1 << 20), index)
    assert caught.value.code == "weights_in_result"
    assert apply_policy({"probe": weight[0] * 2}, OutputPolicy(1 << 20, None, 1 << 20), index).sha256
