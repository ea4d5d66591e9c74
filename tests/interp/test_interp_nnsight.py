"""nnsight-style code in a real sandboxed job: the same numbers as the native RPC, and the four examples ported."""

from __future__ import annotations

import textwrap
from typing import Any

import numpy as np
import pytest

from airlock.interp.workers import ThreadWorker
from tests.conftest import REPO, needs_bwrap
from tests.interp.conftest import RunCode, _run_code

pytestmark = needs_bwrap
EXAMPLES = REPO / "examples" / "interp"


def test_reads_and_edits_match_the_native_rpc(run_code: RunCode) -> None:
    code = textwrap.dedent(
        """
        import numpy as np
        from airlock.interp import client
        from airlock.interp.nnsight import LanguageModel

        def diff(a, b):
            return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())

        def main():
            model = LanguageModel("any")
            prompts = ["the cat sat on", "a dog ran to the"]   # unequal lengths: left-padded like nnsight
            with model.trace(prompts) as tracer:
                last = model.model.layers[1].output[:, -1, :].save()
                whole = model.model.layers[0].output.save()
                attn = model.model.layers[0].self_attn.output[0][:, -1].save()
                mlp_in = model.model.layers[1].mlp.input[:, -1].save()
                mid = model.model.layers[1].post_attention_layernorm.input[:, -1].save()
                best = model.lm_head.output[:, -1].softmax(dim=-1).max(dim=-1).save()
                lens = model.lm_head(model.model.norm(model.model.layers[0].output))[:, -2].topk(3, dim=-1).save()
                norm = np.linalg.norm(model.model.layers[1].output[:, -1], axis=-1).save()
            native = client.trace(
                prompts, read=["model.layers.0", "model.layers.1", "model.layers.0.self_attn",
                               "model.layers.1.post_attention_layernorm", "model.layers.1.self_attn"],
                positions=[-2, -1], lens=["model.layers.0"], top_k=3)
            acts = native.activations
            all_pos = client.trace(prompts[0], read=["model.layers.0"], logits=False).activations["model.layers.0"]
            v = np.linspace(-0.02, 0.02, 64).astype(np.float32)
            with model.trace(prompts[0]):
                model.model.layers[0].output[:] += v
                added = model.model.layers[1].output.save()
            native_added = client.trace(prompts[0], read=["model.layers.1"], patch={"model.layers.0": client.add(v)})
            with model.trace(prompts[0]):
                model.model.layers[0].output[:, -1, :] = model.model.layers[0].output[:, 0, :]
                swapped = model.model.layers[1].output[:, -1].save()
            first = all_pos[0, 0]
            native_swapped = client.trace(prompts[0], read=["model.layers.1"], positions=-1,
                                          patch={"model.layers.0": client.replace(first, positions=-1)})
            d = np.random.default_rng(1).standard_normal(64).astype(np.float32)
            d /= np.linalg.norm(d)
            with model.generate(prompts, max_new_tokens=6) as tracer:
                with tracer.all():
                    for block in model.model.layers:
                        h = block.output
                        block.output[:] = h - (h @ d)[..., None] * d
                ablated = model.generator.output.save()
            native_ablated = client.generate(prompts, patch={client.layer(i): client.ablate(d) for i in range(2)},
                                             max_tokens=6, chat=False)
            with model.generate(prompts[0], max_new_tokens=6) as tracer:
                with tracer.all():
                    model.model.layers[1].output[:] += 4 * v
                steered = tracer.result.save()
            native_steered = client.generate(prompts[0], patch={"model.layers.1": client.add(4 * v)},
                                             max_tokens=6, chat=False)
            strong = 2 * acts["model.layers.1"][1, 1]
            with model.generate(prompts[0], max_new_tokens=6):  # no tracer.all(): nnsight's first step only
                model.model.layers[1].output[:] += strong
                first_step = model.generator.output.save()
            n = len(client.trace(prompts[0], logits=False).tokens[0])
            prompt_only = client.add(strong, positions=list(range(n)))
            native_first = client.generate(prompts[0], patch={"model.layers.1": prompt_only}, max_tokens=6, chat=False)
            every_step = client.generate(prompts[0], patch={"model.layers.1": client.add(strong)}, max_tokens=6,
                                         chat=False)
            return {
                "last": diff(last, acts["model.layers.1"][:, 1]),
                "whole_shape": list(whole.shape), "padding": diff(whole[0, 0], 0.0),
                "whole": diff(whole[0, 1:], all_pos[0]),
                "attn": diff(attn, acts["model.layers.0.self_attn"][:, 1]),
                "mlp_in": diff(mlp_in, acts["model.layers.1.post_attention_layernorm"][:, 1]),
                "mid": diff(mid, acts["model.layers.0"][:, 1] + acts["model.layers.1.self_attn"][:, 1]),
                "best_ids": diff(best.indices, native.top_ids[:, 1, 0]),
                "best_p": diff(best.values, np.exp(native.top_logprobs()[:, 1, 0])),
                "lens_ids": diff(lens.indices, native.lens["model.layers.0"]["token_ids"][:, 0]),
                "lens_lp": diff(lens.values, native.lens["model.layers.0"]["logprobs"][:, 0]),
                "norm": diff(norm, np.linalg.norm(acts["model.layers.1"][:, 1], axis=-1)),
                "added": diff(added, native_added.activations["model.layers.1"]),
                "added_moves": diff(added, client.collect(prompts[0], "model.layers.1")),
                "swapped": diff(swapped, native_swapped.activations["model.layers.1"][:, 0]),
                "ablated": [list(ablated), native_ablated],
                "steered": [list(steered), native_steered],
                "first_step": [list(first_step), native_first, every_step],
                "tokens": tracer.tokens,
            }
        """
    )
    outcome = run_code(code, cpu_seconds=30, wall_seconds=60)
    assert outcome.error is None, outcome.logs
    value = outcome.value
    for key in ("last", "attn", "mlp_in", "best_ids", "lens_ids", "added", "swapped"):
        assert value[key] == 0.0, key
    for key in ("mid", "best_p", "lens_lp", "norm"):
        assert value[key] < 1e-5, key
    # A padded batch of two against the prompt alone: matrix products of other shapes (and, on a host
    # whose engine resizes its thread team by load, other splits) sum in another order.
    assert value["whole"] < 1e-4
    # The shorter prompt is left-padded with zeros, as nnsight's tokenizer pads.
    assert value["whole_shape"] == [2, 5, 64] and value["padding"] == 0.0
    assert value["added_moves"] > 1e-4  # the edit did something
    assert value["ablated"][0] == value["ablated"][1] and value["steered"][0] == value["steered"][1]
    ours, native_first, every_step = value["first_step"]
    assert ours == native_first and native_first != every_step


def test_activation_patching_in_nnsight_form_matches_patching_effects(run_code: RunCode) -> None:
    code = textwrap.dedent(
        """
        from airlock.interp import client
        from airlock.interp.nnsight import LanguageModel

        def main(answer=42):
            model = LanguageModel("any")
            clean, corrupted = "the cat sat on", "a dog ran to"
            with model.trace([clean, corrupted]):
                hs = [block.output[:, -1].save() for block in model.model.layers]
                base = model.lm_head.output[:, -1].log_softmax(dim=-1)[:, answer].save()
            effects = {}
            for i in range(len(model.model.layers)):
                with model.trace(corrupted):
                    model.model.layers[i].output[:, -1] = hs[i][0]
                    patched = model.lm_head.output[:, -1].log_softmax(dim=-1)[:, answer].save()
                effects[f"model.layers.{i}"] = float((patched[0] - base[1]) / (base[0] - base[1]))
            native = client.patching_effects(clean, corrupted, modules=list(effects), answer=answer)
            # The same in nnsight's one-trace form: a clean and a corrupted invoke, the clean run's
            # activation written into the corrupted one.
            invoked = {}
            for i, block in enumerate(model.model.layers):
                with model.trace() as tracer:
                    with tracer.invoke(clean):
                        h = block.output[:, -1]
                        clean_lp = model.lm_head.output[:, -1].log_softmax(dim=-1)[:, answer].save()
                    with tracer.invoke(corrupted):
                        block.output[:, -1] = h
                        patched = model.lm_head.output[:, -1].log_softmax(dim=-1)[:, answer].save()
                invoked[f"model.layers.{i}"] = float((patched[0] - base[1]) / (clean_lp[0] - base[1]))
            with model.trace() as tracer:
                with tracer.invoke(clean):
                    first = model.model.layers[0].output.save()
                with tracer.invoke(corrupted, "one two"):
                    rest = model.model.layers[0].output[:, -1].save()
            return {"effects": effects, "native": native, "invoked": invoked,
                    "rows": [list(first.shape), list(rest.shape)], "returned_as_is": first}
        """
    )
    outcome = run_code(code, cpu_seconds=30, wall_seconds=60)
    assert outcome.error is None, outcome.logs
    effects, native = outcome.value["effects"], outcome.value["native"]
    assert effects == pytest.approx(native, abs=1e-6)
    assert outcome.value["invoked"] == pytest.approx(native, abs=1e-5)
    assert outcome.value["rows"] == [[1, 4, 64], [2, 64]]  # each invoke sees its own rows
    assert np.asarray(outcome.value["returned_as_is"]).shape == (1, 4, 64)  # a saved proxy is its value
    assert effects["model.layers.1"] == pytest.approx(1.0, abs=1e-3)  # the last layer's output decides the answer


def test_what_cannot_run_remotely_is_refused_with_the_way_out(run_code: RunCode) -> None:
    code = textwrap.dedent(
        """
        import numpy as np
        from airlock.interp.nnsight import LanguageModel, NNsightError

        def attempt(fn):
            try:
                fn()
            except NNsightError as exc:
                return str(exc)
            return "ran"

        def main():
            model = LanguageModel("any")

            def first_step_of_unequal_prompts():
                with model.generate(["hi", "hello there you"], max_new_tokens=2):
                    model.model.layers[0].output[:] += np.ones(64, np.float32)

            def position_edit_in_generate():
                with model.generate("hi", max_new_tokens=2) as tracer:
                    with tracer.all():
                        model.model.layers[0].output[:, -1] = 0.0

            def embeddings():
                with model.trace("hi"):
                    model.model.layers[0].input.save()

            def local():
                model.trace("hi", remote=False)

            def branch():
                with model.trace("hi"):
                    if model.model.layers[0].output.sum() > 0:
                        pass

            def twice():
                with model.trace("hi"):
                    model.model.layers[0].output[:] += 1.0
                    model.model.layers[0].output[:] += 1.0

            def other_module():
                with model.trace("hi"):
                    model.model.norm(model.model.layers[0].output).save()

            def whole_vocabulary():
                with model.trace("hi"):
                    logits = model.lm_head.output.save()
                np.asarray(logits.value)

            return {name: attempt(fn) for name, fn in [
                ("first_step_of_unequal_prompts", first_step_of_unequal_prompts),
                ("position_edit_in_generate", position_edit_in_generate),
                ("embeddings", embeddings), ("local", local), ("branch", branch), ("twice", twice),
                ("other_module", other_module), ("whole_vocabulary", whole_vocabulary)]}
        """
    )
    outcome = run_code(code, cpu_seconds=30, wall_seconds=60)
    assert outcome.error is None, outcome.logs
    value = outcome.value
    assert "equal length" in value["first_step_of_unequal_prompts"]
    assert "every position" in value["position_edit_in_generate"]
    assert "embeddings" in value["embeddings"]
    assert "remote=True" in value["local"]
    assert "control flow" in value["branch"]
    assert "edited twice" in value["twice"]
    assert "logit lens" in value["other_module"]
    assert "full logits" in value["whole_vocabulary"]


def _pair(run_code: RunCode, name: str, args: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run the native example and its nnsight port with the same arguments."""
    out = []
    for path in (EXAMPLES / f"{name}.py", EXAMPLES / "nnsight" / f"{name}.py"):
        outcome = run_code(path.read_text(), args=args, cpu_seconds=60, wall_seconds=120)
        assert outcome.error is None, outcome.logs
        out.append(outcome.value)
    return out[0], out[1]


def test_the_ported_examples_give_the_native_numbers(run_code: RunCode) -> None:
    native, port = _pair(run_code, "refusal_probe", {"layer": -1})
    for key in ("train_accuracy", "test_accuracy", "mean_difference_separation"):
        assert port[key] == pytest.approx(native[key], abs=1e-5), key
    np.testing.assert_allclose(port["refusal_direction"], native["refusal_direction"], atol=1e-6)
    native, port = _pair(run_code, "steering", {"layer": 1, "max_tokens": 8})
    assert (port["plain"], port["steered"]) == (native["plain"], native["steered"])
    native, port = _pair(run_code, "refusal_ablation", {"layer": 0, "max_tokens": 6})
    assert (port["baseline"], port["ablated"]) == (native["baseline"], native["ablated"])
    assert port["direction_norm_projection"] == pytest.approx(native["direction_norm_projection"], rel=1e-5)


@pytest.mark.slow
def test_the_logit_lens_port_on_smollm2(smollm2_worker: ThreadWorker) -> None:
    runs = []
    for path in (EXAMPLES / "logit_lens.py", EXAMPLES / "nnsight" / "logit_lens.py"):
        outcome = _run_code(smollm2_worker, path.read_text(), cpu_seconds=120, wall_seconds=300)
        assert outcome.error is None, outcome.logs
        runs.append(outcome.value)
    native, port = runs
    assert port["final_top_token_ids"] == native["final_top_token_ids"]
    assert port["final_answer_logprob"] == pytest.approx(native["final_answer_logprob"], abs=1e-5)
    assert port["first_layer_predicting_answer"] == native["first_layer_predicting_answer"] >= 20
    for ours, theirs in zip(port["layers"], native["layers"], strict=True):
        assert ours["logprobs"] == pytest.approx(theirs["logprobs"], abs=1e-5)


def test_top_logits_answer_exactly_what_was_served() -> None:
    from airlock.interp.nnsight import NNsightError, TopLogits

    full = np.array([[[2.0, 0.5, 1.0, -1.0]]])  # [batch, tokens, vocab]
    lse = np.log(np.exp(full).sum(-1))
    top = TopLogits(np.array([[[0, 2]]]), full[..., [0, 2]], lse, 4, named_ids=[3], named=full[..., [3]])
    probs = np.exp(full - lse[..., None])
    np.testing.assert_allclose(top.softmax(dim=-1).max(dim=-1).values, probs[..., 0])
    np.testing.assert_allclose(top[:, -1].log_softmax(dim=-1)[:, 3], np.log(probs[:, -1, 3]))
    assert top.shape == (1, 1, 4) and top.argmax(dim=-1).tolist() == [[0]]
    with pytest.raises(NNsightError, match="constants"):
        top[0, 0, 1]  # never served
    with pytest.raises(NNsightError, match="full logits"):
        np.asarray(top)
    with pytest.raises(NNsightError, match="top 2"):
        top.topk(3)
