"""Logit lens, written as nnsight code (the port of ``examples/interp/logit_lens.py``).

The same code with nnsight itself, on a model you hold::

    from nnsight import LanguageModel

    model = LanguageModel("HuggingFaceTB/SmolLM2-135M-Instruct")
    with model.trace(prompt, remote=True):
        layers = [
            model.lm_head(model.model.norm(layer.output))[:, -1].log_softmax(dim=-1).topk(top_k, dim=-1).save()
            for layer in model.model.layers
        ]
        final = model.lm_head.output[:, -1].log_softmax(dim=-1).topk(top_k, dim=-1).save()

Here only the import changes; the block runs as Airlock ``trace`` calls from the sandbox.

    airlock interp submit examples/interp/nnsight/logit_lens.py --model smollm2-135m/helpful-only --wait
"""

from airlock.interp.nnsight import LanguageModel


def main(prompt: str = "The capital of France is", top_k: int = 3) -> dict:
    """Return each layer's top next tokens at the last position, and the first layer whose best is the answer."""
    model = LanguageModel("HuggingFaceTB/SmolLM2-135M-Instruct")
    with model.trace(prompt, remote=True):
        layers = [
            model.lm_head(model.model.norm(layer.output))[:, -1].log_softmax(dim=-1).topk(top_k, dim=-1).save()
            for layer in model.model.layers
        ]
        final = model.lm_head.output[:, -1].log_softmax(dim=-1).topk(top_k, dim=-1).save()
    answer = int(final.indices[0, 0])
    first_layer = next((i for i, read in enumerate(layers) if int(read.indices[0, 0]) == answer), None)
    for i, read in enumerate(layers):
        print(f"layer {i:>2}: {read.indices[0].tolist()}")
    return {
        "prompt": prompt,
        "layers": [
            {"layer": i, "token_ids": read.indices[0].tolist(), "logprobs": read.values[0].tolist()}
            for i, read in enumerate(layers)
        ],
        "final_top_token_ids": final.indices[0].tolist(),
        "final_answer_id": answer,
        "final_answer_logprob": float(final.values[0, 0]),
        "first_layer_predicting_answer": first_layer,
    }
