"""Logit lens: what each layer's residual stream would predict as the next token.

airlock interp submit examples/interp/logit_lens.py --model smollm2-135m/helpful-only \
        --arg prompt='"The capital of France is"' --wait --out lens-result
"""

from airlock.interp import client


def main(prompt: str = "The capital of France is", top_k: int = 3) -> dict:
    """Return the top tokens per layer at the last position, and the layer where the final answer first leads."""
    rows = client.logit_lens(prompt, top_k=top_k)
    final = rows[-1]
    answer = client.trace(prompt, positions=-1, lens=[client.layer(-1)], top_k=1).lens[client.layer(-1)]
    # Logits come back as the top k plus the token ids you name (with the log-sum-exp), so the
    # answer's exact log-probability needs no full-vocabulary logits.
    answer_id = final["token_ids"][0]
    answer_logprob = float(client.trace(prompt, positions=-1, token_ids=[answer_id], top_k=1).token_logprobs()[0, 0, 0])
    first_layer = None
    for row in rows[:-1]:
        print(f"layer {row['layer']:>2}: {row['tokens']}")
        if first_layer is None and row["tokens"][0] == answer["tokens"][0][0][0]:
            first_layer = row["layer"]
    return {
        "prompt": prompt,
        "layers": rows[:-1],
        "final_top_token_ids": final["token_ids"],
        "final_answer": answer["tokens"][0][0][0],
        "final_answer_logprob": answer_logprob,
        "first_layer_predicting_answer": first_layer,
    }
