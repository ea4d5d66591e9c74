"""Steering: add a contrastive activation vector while the model writes (activation addition).

The vector is the difference between the model's activations on two contrasting prompts at one
layer; adding it at every position pushes generations toward the first prompt's theme.

    airlock interp submit examples/interp/steering.py --model smollm2-135m/helpful-only \
        --arg scale=1.0 --wait
"""

from airlock.interp import client


def main(
    toward: str = "I love talking about the ocean, waves and the sea.",
    away: str = "I love talking about things.",
    prompt: str = "Tell me about your weekend.",
    layer: int = 12,
    scale: float = 1.0,
    max_tokens: int = 40,
) -> dict:
    """Return the unsteered and steered continuations of ``prompt``."""
    module = client.layer(layer)
    acts = client.collect([toward, away], module, chat=False)
    vector = acts[0] - acts[1]
    plain = client.generate(prompt, max_tokens=max_tokens)[0]
    # The raw difference keeps the activations' own scale (about a quarter of the residual norm here).
    steered = client.steer(prompt, module, vector, scale=scale, max_tokens=max_tokens)[0]
    print(f"plain:   {plain!r}\nsteered: {steered!r}")
    return {"module": module, "scale": scale, "plain": plain, "steered": steered}
