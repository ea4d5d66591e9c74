"""The model work behind the RPC (modules, trace with reads and patches, generate), without a sandbox."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from airlock.interp.errors import RequestError
from airlock.interp.tracing import ServeBudget, describe, run_generate, run_trace
from airlock.interp.workers import ThreadWorker


def _trace(worker: ThreadWorker, budget: ServeBudget | None = None, **request: Any) -> dict[str, Any]:
    reply: dict[str, Any] = worker.submit(lambda m, t: run_trace(m, t, request, budget=budget)).result()
    return reply


def _reference(worker: ThreadWorker, prompt: str) -> Any:
    def run(model: Any, tokenizer: Any) -> Any:
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        return model(input_ids=ids, output_hidden_states=True)

    return worker.submit(run).result()


def test_trace_matches_a_plain_forward_pass(tiny_worker: ThreadWorker) -> None:
    prompts = ["hello there world", "a"]
    full = ServeBudget(full_logits=True)
    reads = ["model.layers.0", "model.norm"]
    reply = _trace(tiny_worker, full, prompts=prompts, read=reads, positions=[-1, 0], logits="full", token_ids=[7, 9])
    for b, prompt in enumerate(prompts):
        ref = _reference(tiny_worker, prompt)
        n = ref.logits.shape[1]
        assert reply["positions"][b] == [n - 1, 0]
        # hidden_states: embeddings, then each layer's output, the last one after the final norm.
        for module, states in (("model.layers.0", ref.hidden_states[1]), ("model.norm", ref.hidden_states[2])):
            expected = states[0, [n - 1, 0]].numpy()
            np.testing.assert_allclose(reply["activations"][module][b], expected, rtol=1e-4, atol=1e-4)
        logits = ref.logits[0, [n - 1, 0]]
        np.testing.assert_allclose(reply["logits"][b], logits.numpy(), rtol=1e-4, atol=1e-4)
        # Top-k, the requested ids and the normaliser agree with the full logits.
        top = logits.topk(5, dim=-1)
        assert (reply["top_logits"]["ids"][b] == top.indices.numpy()).all()
        np.testing.assert_allclose(reply["top_logits"]["values"][b], top.values.numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(reply["token_logits"]["values"][b], logits[:, [7, 9]].numpy(), rtol=1e-4, atol=1e-4)
        lse = torch.logsumexp(logits, dim=-1).numpy()
        np.testing.assert_allclose(reply["logsumexp"][b], lse, rtol=1e-5, atol=1e-4)
    assert reply["tokens"][1] == ["a"]
    # Without the grant term, logits are top-k and requested ids only, and full logits are refused.
    plain = _trace(tiny_worker, prompts=prompts, positions=[-1, 0], token_ids=[7, 9])
    assert "logits" not in plain and plain["top_logits"]["ids"].shape == (2, 2, 5)
    np.testing.assert_array_equal(plain["token_logits"]["values"], reply["token_logits"]["values"])
    with pytest.raises(RequestError, match="full-vocabulary logits need a grant that allows them"):
        _trace(tiny_worker, prompts=prompts, logits="full")


def test_trace_all_positions_pads_short_prompts_with_zeros(tiny_worker: ThreadWorker) -> None:
    reply = _trace(tiny_worker, prompts=["one two three four", "one"], read=["model.layers.1.mlp"], logits=False)
    acts = reply["activations"]["model.layers.1.mlp"]
    assert acts.shape == (2, 4, 64) and "logits" not in reply
    assert np.all(acts[1, 1:] == 0) and np.any(acts[1, 0] != 0)


def test_patches_replace_add_and_ablate(tiny_worker: ThreadWorker) -> None:
    base = _trace(tiny_worker, prompts=["the cat sat"], read=["model.layers.0", "model.layers.1"], positions=[-1])
    h0 = base["activations"]["model.layers.0"][0, 0]
    direction = np.random.default_rng(0).standard_normal(64).astype(np.float32)

    ablated = _trace(
        tiny_worker,
        prompts=["the cat sat"],
        read=["model.layers.0"],
        positions=[-1],
        patch={"model.layers.0": {"op": "ablate", "value": direction, "positions": None}},
    )["activations"]["model.layers.0"][0, 0]
    unit = direction / np.linalg.norm(direction)
    assert abs(float(ablated @ unit)) < 1e-3 and abs(float(h0 @ unit)) > 1e-2
    np.testing.assert_allclose(ablated, h0 - (h0 @ unit) * unit, rtol=1e-4, atol=1e-4)

    added = _trace(
        tiny_worker,
        prompts=["the cat sat"],
        read=["model.layers.0"],
        positions=[-1],
        patch={"model.layers.0": {"op": "add", "value": direction, "positions": [-1]}},
    )["activations"]["model.layers.0"][0, 0]
    np.testing.assert_allclose(added, h0 + direction, rtol=1e-4, atol=1e-4)

    # Replacing layer 0's output with another prompt's changes what layer 1 and the logits see.
    other = _trace(tiny_worker, prompts=["a dog ran"], read=["model.layers.0"], positions=[-1])
    patched = _trace(
        tiny_worker,
        prompts=["the cat sat"],
        read=["model.layers.1"],
        positions=[-1],
        patch={
            "model.layers.0": {"op": "set", "value": other["activations"]["model.layers.0"][0, 0], "positions": [-1]}
        },
    )
    assert not np.allclose(patched["activations"]["model.layers.1"], base["activations"]["model.layers.1"])
    assert not np.allclose(patched["top_logits"]["values"], base["top_logits"]["values"])


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        ({"prompts": []}, "non-empty list"),
        ({"prompts": ["x"], "read": ["lm_head"]}, "'lm_head' is not readable"),
        ({"prompts": ["x"], "read": ["model.layers.9"]}, "the model has 2 layers"),
        ({"prompts": ["x"], "positions": [5]}, "position 5 is out of range"),
        ({"prompts": ["x"], "top_k": 0}, "top_k"),
        ({"prompts": ["x"], "top_k": 65}, "top_k must be between 1 and 64"),
        ({"prompts": ["x"], "token_ids": list(range(257))}, "at most 256 token_ids"),
        ({"prompts": ["x"], "token_ids": [49152]}, "token id 49152 is out of range"),
        ({"prompts": ["x"], "logits": "all"}, "logits must be"),
        ({"prompts": ["x"], "patch": {"model.layers.0": {"op": "grad", "value": np.zeros(64, np.float32)}}}, "patch"),
        ({"prompts": ["x"], "patch": {"model.layers.0": {"op": "add", "value": np.zeros(3, np.float32)}}}, "hidden"),
        ({"prompts": ["x"], "patch": {"model.layers.0": {"op": "ablate", "value": np.zeros(64, np.float32)}}}, "zero"),
        ({"prompts": ["x"] * 65}, "at most 64 prompts"),
    ],
)
def test_bad_requests_are_refused_with_a_reason(
    tiny_worker: ThreadWorker, request_: dict[str, Any], message: str
) -> None:
    with pytest.raises(RequestError, match=message):
        _trace(tiny_worker, **request_)


def test_generate_is_deterministic_and_steerable(tiny_worker: ThreadWorker) -> None:
    def gen(**request: Any) -> list[str]:
        reply: dict[str, Any] = tiny_worker.submit(lambda m, t: run_generate(m, t, request)).result()
        return list(reply["texts"])

    plain = gen(prompts=["hello", "world"], max_tokens=6, chat=False)
    assert plain == gen(prompts=["hello", "world"], max_tokens=6, chat=False) and all(plain)
    vector = np.full(64, 5.0, dtype=np.float32)
    steered = gen(prompts=["hello"], max_tokens=6, chat=False, patch={"model.layers.0": {"op": "add", "value": vector}})
    assert steered[0] != plain[0]
    sampled = gen(prompts=["hello"], max_tokens=6, chat=False, temperature=1.0, top_p=0.9, seed=3)
    assert sampled == gen(prompts=["hello"], max_tokens=6, chat=False, temperature=1.0, top_p=0.9, seed=3)
    with pytest.raises(RequestError, match="max_tokens"):
        gen(prompts=["hello"], max_tokens=10_000)


def test_describe_lists_modules_not_parameters(tiny_worker: ThreadWorker) -> None:
    info = tiny_worker.submit(lambda m, t: describe(m)).result()
    names = [entry["name"] for entry in info["modules"]]
    assert info["n_layers"] == 2 and info["hidden_size"] == 64
    assert "model.layers.1.self_attn" in names and "model.norm" in names
    assert not any("weight" in n or "embed" in n or "lm_head" in n for n in names)
