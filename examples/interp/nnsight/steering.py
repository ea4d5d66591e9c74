"""Activation steering, written as nnsight code (the port of ``examples/interp/steering.py``).

With nnsight itself, on a model you hold::

    with model.trace([toward, away], remote=True):
        acts = model.model.layers[layer].output[:, -1, :].save()
    vector = acts[0] - acts[1]
    with model.generate(chat(prompt), max_new_tokens=40, remote=True) as tracer:
        plain = model.generator.output.save()
    with model.generate(chat(prompt), max_new_tokens=40, remote=True) as tracer:
        with tracer.all():
            model.model.layers[layer].output[:] += scale * vector
        steered = model.generator.output.save()

Here the edit, recognised as adding one vector at every position, runs as Airlock's ``add`` at
every generation step; ``chat=True`` stands for the local chat template.

    airlock interp submit examples/interp/nnsight/steering.py --model smollm2-135m/helpful-only --arg scale=1.0 --wait
"""

from airlock.interp.nnsight import LanguageModel


def main(
    toward: str = "I love talking about the ocean, waves and the sea.",
    away: str = "I love talking about things.",
    prompt: str = "Tell me about your weekend.",
    layer: int = 12,
    scale: float = 1.0,
    max_tokens: int = 40,
) -> dict:
    """Return the unsteered and steered continuations of ``prompt``."""
    model = LanguageModel("HuggingFaceTB/SmolLM2-135M-Instruct")
    with model.trace([toward, away], remote=True):
        acts = model.model.layers[layer].output[:, -1, :].save()
    vector = acts[0] - acts[1]
    with model.generate(prompt, max_new_tokens=max_tokens, remote=True, chat=True):
        plain = model.generator.output.save()
    with model.generate(prompt, max_new_tokens=max_tokens, remote=True, chat=True) as tracer:
        with tracer.all():
            model.model.layers[layer].output[:] += scale * vector
        steered = model.generator.output.save()
    print(f"plain:   {plain[0]!r}\nsteered: {steered[0]!r}")
    return {"layer": layer, "scale": scale, "plain": plain[0], "steered": steered[0]}
