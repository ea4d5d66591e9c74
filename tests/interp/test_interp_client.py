"""The evaluator library's helpers: pure ones in-process, RPC ones inside a real sandboxed job."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest

from airlock.interp import client
from tests.conftest import needs_bwrap


def test_train_probe_separates_separable_data_and_holds_out_a_split() -> None:
    rng = np.random.default_rng(0)
    direction = rng.standard_normal(16)
    unit = direction / np.linalg.norm(direction)
    y = np.arange(200) % 2
    # Separable with a margin along `direction`, on top of unscaled, offset noise.
    x = rng.standard_normal((200, 16)) * 3.0 + 5.0 + np.outer(np.where(y == 1, 4.0, -4.0), unit)
    x -= np.outer((x - 5.0) @ unit - np.where(y == 1, 4.0, -4.0), unit) * 0.9
    probe = client.train_probe(x, y, steps=800)
    assert probe.train_accuracy > 0.95 and probe.test_accuracy is not None and probe.test_accuracy > 0.95
    cosine = float(probe.direction() @ direction / np.linalg.norm(direction))
    assert cosine > 0.8
    assert probe.predict(x).shape == (200,)
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        client.train_probe(x, y + 1)
    with pytest.raises(ValueError, match="x must be"):
        client.train_probe(x, y[:10])


def test_mean_difference_and_log_softmax() -> None:
    a = np.array([[1.0, 0.0], [3.0, 0.0]])
    b = np.array([[0.0, 0.0], [0.0, 0.0]])
    np.testing.assert_allclose(client.mean_difference(a, b), [1.0, 0.0])
    logits = np.array([[1.0, 2.0, 3.0], [1000.0, 0.0, -1000.0]])
    out = client.log_softmax(logits)
    np.testing.assert_allclose(np.exp(out).sum(axis=-1), [1.0, 1.0])
    assert np.isfinite(out[1, :2]).all()


def test_patch_helpers_build_wire_specs() -> None:
    spec = client.add([1, 2], scale=2.0, positions=-1)
    assert spec["op"] == "add" and spec["positions"] == [-1] and spec["value"].tolist() == [2.0, 4.0]
    assert client.ablate(np.ones(3))["positions"] is None and client.replace([0.5])["op"] == "set"
    with pytest.raises(RuntimeError, match="only inside an Airlock interp job"):
        client.trace("hi")


@needs_bwrap
def test_rpc_helpers_in_a_sandboxed_job(run_code) -> None:
    code = textwrap.dedent(
        """
        import numpy as np
        from airlock.interp import client

        def main():
            last, first = client.layer(-1), client.layer(0)
            effects = client.patching_effects("the cat sat on", "a dog ran to", modules=[last, first], answer=42)
            acts = client.collect(["a", "b c", "d e f"], first, batch_size=2)
            lens = client.logit_lens("hello world", top_k=2)
            steered = client.steer("hello", first, np.full(64, 4.0, np.float32), scale=1.0, max_tokens=5, chat=False)
            plain = client.generate("hello", max_tokens=5, chat=False)
            mods = client.modules()
            return {"effects": effects, "acts_shape": list(acts.shape), "lens_layers": [r["layer"] for r in lens],
                    "steered_differs": steered != plain, "n_modules": len(mods)}
        """
    )
    outcome = run_code(code)
    assert outcome.error is None, outcome.logs
    value = outcome.value
    # Patching the last layer's output at the last position restores the clean prediction exactly.
    assert value["effects"]["model.layers.1"] == pytest.approx(1.0, abs=1e-3)
    assert np.isfinite(value["effects"]["model.layers.0"])
    assert value["acts_shape"] == [3, 64]
    assert value["lens_layers"] == [0, 1, "final"]
    assert value["steered_differs"] is True
    assert value["n_modules"] == 2 * 5 + 1


@needs_bwrap
def test_scikit_learn_is_available_in_the_runner_when_installed(run_code) -> None:
    import importlib.util

    if importlib.util.find_spec("sklearn") is None:
        pytest.skip("scikit-learn is not installed on the host, so the runner has none either")
    code = textwrap.dedent(
        """
        import numpy as np
        from sklearn.linear_model import LogisticRegression

        def main():
            x = np.array([[0.0], [1.0], [2.0], [3.0]])
            return {"predicted": LogisticRegression().fit(x, [0, 0, 1, 1]).predict([[0.1], [2.9]]).tolist()}
        """
    )
    outcome = run_code(code, cpu_seconds=30, memory_mb=2048)
    assert outcome.error is None, outcome.logs
    assert outcome.value == {"predicted": [0, 1]}
