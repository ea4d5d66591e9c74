"""What interp lets out: logits bounded by design, costs estimated and refused up front, results hashed whole."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from airlock.interp import _wire, client, host

HIDDEN = 64
VOCAB = 49152


def _trace(worker: host.ThreadWorker, budget: host.ServeBudget | None = None, **request: Any) -> dict[str, Any]:
    reply: dict[str, Any] = worker.submit(lambda m, t: host.run_trace(m, t, request, budget=budget)).result()
    return reply


def _plan(worker: host.ThreadWorker, budget: host.ServeBudget | None = None, **request: Any) -> Any:
    return worker.submit(lambda m, t: host.plan_trace(m, t, request, budget=budget)).result()


@pytest.fixture
def forward_calls(tiny_worker: host.ThreadWorker) -> Iterator[list[int]]:
    """Count the forward passes of the tiny model's first decoder layer while the test runs."""
    calls: list[int] = []

    def install(model: Any, _tokenizer: Any) -> Any:
        return model.model.layers[0].register_forward_hook(lambda *_args: calls.append(1))

    handle = tiny_worker.submit(install).result()
    yield calls
    handle.remove()


# ---------------------------------------------------------------------------------- refused up front


def test_oversized_requests_are_refused_before_the_model_runs(
    tiny_worker: host.ThreadWorker, forward_calls: list[int]
) -> None:
    long_prompts = ["word " * 1000] * 8
    full = host.ServeBudget(full_logits=True)
    # Full logits over every position: 8 x 1001 x 49152 float32 is 1.5 GiB, past the reply cap.
    with pytest.raises(host.RequestError, match=r"this trace would reply with up to \d+ bytes; the cap is 268435456"):
        _trace(tiny_worker, full, prompts=long_prompts, logits="full")
    with pytest.raises(host.RequestError, match=r"would need about \d+ MiB of host memory; the cap is 64 MiB"):
        _trace(tiny_worker, host.ServeBudget(max_host_bytes=64 * host.MiB), prompts=long_prompts)
    budget = host.ServeBudget(served_left=1000, served_budget=5000)
    with pytest.raises(host.RequestError, match=r"only 1000 of 5000 bytes of the grant's interp serving budget"):
        _trace(tiny_worker, budget, prompts=["hello world"] * 4, read=["model.layers.0"])
    with pytest.raises(host.RequestError, match=r"this generate would reply with up to \d+ bytes; the cap is 4096"):
        tiny_worker.submit(
            lambda m, t: host.run_generate(
                m, t, {"prompts": ["hi"] * 64, "max_tokens": 256}, budget=host.ServeBudget(max_reply_bytes=4096)
            )
        ).result()
    assert forward_calls == [] and budget.served == 0


def test_the_default_trace_of_long_prompts_is_served_cheaply(
    tiny_worker: host.ThreadWorker, forward_calls: list[int]
) -> None:
    # The defaults (all positions, logits on) no longer mean the whole vocabulary at every position.
    long_prompts = ["word " * 1000] * 8
    plan = _plan(tiny_worker, prompts=long_prompts)
    assert plan.estimate.reply_bytes < 1024 * 1024
    assert plan.estimate.host_bytes <= host.DEFAULT_MAX_HOST_BYTES
    budget = host.ServeBudget()
    reply = _trace(tiny_worker, budget, prompts=long_prompts)
    assert "logits" not in reply and reply["top_logits"]["ids"].shape == (8, 1001, 5)
    assert len(_wire.encode({"ok": True, **reply})) <= plan.estimate.reply_bytes
    assert budget.served == host.served_payload(reply) <= plan.estimate.served_bytes
    assert forward_calls


SYSTEM = {host.SYSTEM_KEY: "Be careful and kind."}
REQUESTS: list[dict[str, Any]] = [
    {"prompts": ["hello there world", "a"], "read": ["model.layers.0", "model.norm"], "positions": [-1, 0]},
    {"prompts": ["the cat sat on the mat", "x y"], "lens": ["model.layers.0", "model.norm"], "top_k": 7},
    {"prompts": ['é😀 ünïcödé \n\t"quotes"', "a"], "token_ids": list(range(0, 49152, 193)), "top_k": 64},
    {"prompts": ["hello", "hi there"], "chat": True, "read": ["model.layers.1.mlp"], **SYSTEM},
    {"prompts": ["one two three"], "logits": False, "read": ["model.layers.1"], "positions": [-1]},
    {"prompts": ["short", "a much longer prompt than the first"], "logits": "full", "lens": ["model.layers.1"]},
]


@pytest.mark.parametrize("request_", REQUESTS)
def test_the_estimate_bounds_the_real_reply(tiny_worker: host.ThreadWorker, request_: dict[str, Any]) -> None:
    budget = host.ServeBudget(full_logits=True)
    plan = _plan(tiny_worker, budget, **request_)
    reply = _trace(tiny_worker, budget, **request_)
    size = len(_wire.encode({"ok": True, **reply}))
    assert size <= plan.estimate.reply_bytes <= 2 * size + 64 * 1024, (size, plan.estimate)
    assert budget.served == host.served_payload(reply) <= plan.estimate.served_bytes


def test_the_generate_estimate_bounds_the_real_reply(tiny_worker: host.ThreadWorker) -> None:
    request = {"prompts": ["hello", "é😀 tell me more"], "max_tokens": 24, "temperature": 1.0, "seed": 5}
    budget = host.ServeBudget()
    reply = tiny_worker.submit(lambda m, t: host.run_generate(m, t, request, budget=budget)).result()

    def estimate(model: Any, tokenizer: Any) -> host.Estimate:
        _texts, longest_json, longest_utf8 = host._token_texts(tokenizer)
        lengths = [len(host._encode(tokenizer, p, True)[0]) for p in request["prompts"]]
        return host.estimate_generate(host._dims(model), lengths, 24, longest_json, longest_utf8)

    bound = tiny_worker.submit(estimate).result()
    assert all(reply["texts"])
    assert len(_wire.encode({"ok": True, **reply})) <= bound.reply_bytes
    assert budget.served == host.served_payload(reply) <= bound.served_bytes


def test_micro_batches_give_the_results_of_one_batch(tiny_worker: host.ThreadWorker) -> None:
    prompts = [" ".join(["word"] * (40 + 30 * i)) for i in range(5)]
    replacement = np.random.default_rng(0).standard_normal((5, 1, HIDDEN)).astype(np.float32) * 0.1
    request = {
        "prompts": prompts,
        "read": ["model.layers.1"],
        "positions": [-1, 3],
        "token_ids": [11, 12],
        "lens": ["model.layers.0"],
        "patch": {"model.layers.0": {"op": "add", "value": replacement[0, 0], "positions": [2]}},
    }
    whole = _plan(tiny_worker, **request)
    assert whole.estimate.batches == ((0, 5),)

    def forward(batch: int, width: int) -> int:
        return tiny_worker.submit(lambda m, t: host._forward_bytes(host._dims(m), batch, width)).result()

    # A cap that fits two of the longest prompts' forward pass, not all five.
    longest = max(len(ids) for ids in whole.encoded)
    cap = whole.estimate.host_bytes - forward(5, longest) + forward(2, longest)
    budget = host.ServeBudget(max_host_bytes=cap)
    split = _plan(tiny_worker, budget, **request)
    assert len(split.estimate.batches) >= 2 and split.estimate.host_bytes <= cap
    one, many = _trace(tiny_worker, **request), _trace(tiny_worker, budget, **request)
    np.testing.assert_allclose(
        many["activations"]["model.layers.1"], one["activations"]["model.layers.1"], rtol=1e-4, atol=1e-4
    )
    np.testing.assert_allclose(many["token_logits"]["values"], one["token_logits"]["values"], rtol=1e-4, atol=1e-4)
    assert (many["lens"]["model.layers.0"]["token_ids"] == one["lens"]["model.layers.0"]["token_ids"]).all()
    # A per-prompt replacement is cut to each micro-batch.
    per_prompt = dict(request, patch={"model.layers.0": {"op": "set", "value": replacement, "positions": [-1]}})
    np.testing.assert_allclose(
        _trace(tiny_worker, budget, **per_prompt)["activations"]["model.layers.1"],
        _trace(tiny_worker, **per_prompt)["activations"]["model.layers.1"],
        rtol=1e-4,
        atol=1e-4,
    )


# ---------------------------------------------------------------------------------- result digest


def _released(value: Any) -> host.Released:
    return host.apply_policy(value, host.OutputPolicy(1 << 20, None, 1 << 20), None)


def _npz(released: host.Released) -> dict[str, np.ndarray[Any, Any]]:
    with np.load(io.BytesIO(released.npz)) as data:
        return {name: data[name] for name in data.files}


def test_result_sha256_covers_the_json_values_and_the_arrays() -> None:
    arrays = {"x": np.arange(12, dtype=np.float32).reshape(3, 4)}
    first = _released({"accuracy": 0.91, **arrays})
    second = _released({"accuracy": 0.12, **arrays})
    assert first.npz == second.npz and first.sha256 != second.sha256
    # Results without arrays are told apart too (they used to share the empty NPZ's hash).
    assert _released({"a": 1}).sha256 != _released({"a": 2}).sha256 != _released({}).sha256
    # The same values in another key order are the same result; another dtype or value is not.
    assert _released({"b": [1, 2], "a": "x"}).sha256 == _released({"a": "x", "b": [1, 2]}).sha256
    assert _released({"x": arrays["x"].astype(np.float64)}).sha256 != _released(arrays).sha256
    changed = arrays["x"].copy()
    changed[2, 3] += 1
    assert _released({"x": changed}).sha256 != _released(arrays).sha256
    # The evaluator recomputes it from what the API returns: the JSON value and the NPZ.
    for released in (first, second, _released({"nested": [{"y": np.ones(3, np.int8)}, float("nan")]})):
        assert client.result_sha256(released.document, _npz(released)) == released.sha256
    for unrepresentable in ({"text": "\ud800"}, {"count": 2**60}):
        with pytest.raises(host.InterpJobError, match="not exactly representable as JSON") as caught:
            _released(unrepresentable)
        assert caught.value.code == "invalid_result"
    with pytest.raises(host.InterpJobError, match="'__array__' is reserved"):
        _released({"fake": {"__array__": "a0"}})
