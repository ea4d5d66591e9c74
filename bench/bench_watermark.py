"""The sampling watermark: its cost per token vs plain sampling, and (``--trials N``) what it buys and costs.

Cost: the local backend generates the same batch (``--rows`` choices of one prompt at temperature
1) with and without a grant's key, interleaved and repeated; the figure is seconds per generated
token, watermarked over plain, min/median/max over the repetitions. The sampling step alone
(no forward pass) is timed the same way, to show the absolute cost per token on a faster model.

    python bench/bench_watermark.py --quick          # cost only, under 2 minutes
    python bench/bench_watermark.py                  # cost, more tokens and repetitions
    python bench/bench_watermark.py --trials 100     # cost, then the measurement below

On a machine shared with other work, ``OMP_NUM_THREADS=1`` avoids oversubscribed OpenMP teams
(which can slow every forward pass twentyfold); the header prints the thread count used.

``--trials N`` measures on the model (SmolLM2-135M by default), with ``--grants`` grant keys:

- attribution: N watermarked texts (``--length`` tokens each, a different grant and prompt per
  trial) tested against every grant as ``airlock leak trace`` does (Bonferroni over grants);
- false attribution: N plain texts (same prompts), and the watermarked texts under wrong keys;
- token distributions: (a) per step, on the N prompts, a chi-square goodness-of-fit test of
  N x grants watermarked draws (one per prompt and grant key) against the model's own next-token
  distributions, with plain draws as the control; (b) per text, a permutation test of the token
  frequencies of the watermarked vs the plain texts (texts are the exchangeable units, so the
  tokens' dependence within a text does not matter);
- eval accuracy: short factual questions answered with and without the watermark (several samples
  each), the accuracies with Wilson intervals and their difference with a Newcombe interval.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import math
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))
os.environ.setdefault("AIRLOCK_MODEL_CACHE", str(REPO / ".cache" / "models"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.stats import chisquare  # noqa: E402

from _common import TOPICS as COMMON_TOPICS  # noqa: E402
from _common import loadavg, report, spread  # noqa: E402
from airlock.backends import weights  # noqa: E402
from airlock.backends.local import LocalBackend  # noqa: E402
from airlock.backends.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest  # noqa: E402
from airlock.backends.watermark import CONTEXT, detect, draw_candidates, sample_batch  # noqa: E402

TOPICS = [
    *COMMON_TOPICS,
    "the invention of the telescope",
    "a small fishing village",
    "how rivers shape valleys",
    "a library at night",
]
OPENERS = [
    "Here is a long essay about {}.\n\n",
    "The following is a detailed story about {}.\n\n",
    "Chapter one: {}.\n\n",
    "Notes from a lecture on {}.\n\n",
    "A travel diary entry about {}.\n\n",
    "An encyclopedia article on {}.\n\n",
]
QUESTIONS = [
    ("What is the capital of France?", "paris"),
    ("What is the capital of Japan?", "tokyo"),
    ("What is the capital of Italy?", "rome"),
    ("What is the capital of Germany?", "berlin"),
    ("What is the capital of Spain?", "madrid"),
    ("What is the capital of England?", "london"),
    ("What color is the sky on a clear day?", "blue"),
    ("What color is grass?", "green"),
    ("How many days are in a week?", "seven|7"),
    ("How many legs does a spider have?", "eight|8"),
    ("What is 2 + 2?", "four|4"),
    ("What is 3 + 5?", "eight|8"),
    ("Which planet do we live on?", "earth"),
    ("What do bees make?", "honey"),
    ("What is frozen water called?", "ice"),
    ("What animal says moo?", "cow"),
    ("Which star is closest to the Earth?", "sun"),
    ("What is the opposite of hot?", "cold"),
    ("How many hours are in a day?", "24|twenty-four"),
    ("What gas do humans need to breathe?", "oxygen"),
]


def grant_key(i: int) -> bytes:
    """Return grant ``i``'s watermark key (HMAC-derived, as the gateway derives them from the lab secret)."""
    return hmac.new(b"bench-lab-secret", f"watermark:grant-{i}".encode(), hashlib.sha256).digest()


def prompt(i: int) -> str:
    """Return the ``i``-th text prompt (topics x openers, all distinct for i < 120)."""
    return OPENERS[(i // len(TOPICS)) % len(OPENERS)].format(TOPICS[i % len(TOPICS)])


def completion(text: str, key: bytes | None, *, tokens: int, n: int, seed: int) -> CompletionRequest:
    """Return a temperature-1 completion request, carrying ``key``'s watermark when one is given."""
    request = CompletionRequest(model="bench", prompt=text, temperature=1.0, max_tokens=tokens, n=n, seed=seed)
    request.set_watermark_key(key)
    return request


# --- cost -------------------------------------------------------------------------------------


async def cost(backend: LocalBackend, rows: int, tokens: int, reps: int) -> dict[str, list[float]]:
    """Time the same batch with and without a key, interleaved (order alternating); seconds per token."""
    out: dict[str, list[float]] = {"plain": [], "watermarked": [], "ratio": []}
    await backend.complete(completion(prompt(0), grant_key(0), tokens=8, n=rows, seed=0))  # warm-up
    for rep in range(reps):
        per: dict[str, float] = {}
        for label in ["plain", "watermarked"] if rep % 2 == 0 else ["watermarked", "plain"]:
            key = grant_key(0) if label == "watermarked" else None
            started = time.perf_counter()
            result = await backend.complete(completion(prompt(rep), key, tokens=tokens, n=rows, seed=rep))
            per[label] = (time.perf_counter() - started) / max(1, result.usage.completion_tokens)
            out[label].append(per[label])
        out["ratio"].append(per["watermarked"] / per["plain"])
    return out


def sampling_cost(vocab: int, rows: int, reps: int, steps: int = 20) -> dict[str, list[float]]:
    """Time the sampling step alone for ``rows`` rows (as the engine does it), microseconds per token."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, vocab, generator=gen) * 4
    generators = [torch.Generator().manual_seed(i) for i in range(rows)]
    key = grant_key(0)
    out: dict[str, list[float]] = {"plain": [], "inverse-cdf": [], "watermarked": [], "ratio": [], "ratio-cdf": []}

    def plain(step: int) -> None:
        # The engine's plain draw: multinomial without replacement (one exponential per vocabulary entry).
        for i in range(rows):
            torch.multinomial(torch.softmax(logits[i], dim=-1), 1, generator=generators[i])

    def inverse_cdf(step: int) -> None:
        # A cheaper plain draw (a cumulative sum, one uniform, a binary search): the lower baseline.
        # (torch.multinomial draws a single sample by the exponential trick even with replacement.)
        for i in range(rows):
            cdf = torch.softmax(logits[i], dim=-1).cumsum(0)
            torch.searchsorted(cdf, torch.rand(1, generator=generators[i]) * cdf[-1])

    def marked(step: int) -> None:
        candidates = torch.stack(
            [draw_candidates(torch.softmax(logits[i], dim=-1), generators[i]) for i in range(rows)]
        )
        sample_batch(candidates, [(key, (step, i, 1, 2)) for i in range(rows)], vocab)

    for rep in range(reps):
        per: dict[str, float] = {}
        order = [("plain", plain), ("inverse-cdf", inverse_cdf), ("watermarked", marked)]
        for label, fn in order[:: 1 if rep % 2 == 0 else -1]:
            started = time.perf_counter()
            for step in range(steps):
                fn(rep * steps + step)
            per[label] = (time.perf_counter() - started) / (steps * rows) * 1e6
            out[label].append(per[label])
        out["ratio"].append(per["watermarked"] / per["plain"])
        out["ratio-cdf"].append(per["watermarked"] / per["inverse-cdf"])
    return out


# --- measurement ------------------------------------------------------------------------------


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Return the Wilson score interval of ``k`` successes out of ``n``."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def newcombe(k1: int, n1: int, k2: int, n2: int) -> tuple[float, float]:
    """Return the Newcombe (hybrid Wilson) 95 % interval of p1 - p2."""
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson(k1, n1)
    l2, u2 = wilson(k2, n2)
    d = p1 - p2
    return (d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2))


async def generate_texts(
    backend: LocalBackend, trials: list[int], length: int, keys: list[bytes]
) -> tuple[list[str], list[int], list[str], list[int]]:
    """Generate a watermarked (trial ``t`` under ``keys[t]``) and a plain text per trial, all in flight at once."""
    requests = [completion(prompt(t), keys[t], tokens=length, n=1, seed=t) for t in trials]
    requests += [completion(prompt(t), None, tokens=length, n=1, seed=10**6 + t) for t in trials]
    results = await asyncio.gather(*(backend.complete(r) for r in requests))
    texts = [r.choices[0].text for r in results]
    counts = [r.usage.completion_tokens for r in results]
    n = len(trials)
    return texts[:n], counts[:n], texts[n:], counts[n:]


async def generate_shard(spec: str, trials: list[int], length: int, keys: list[bytes], samples: int) -> dict[str, Any]:
    """Generate one shard's texts (and, in the shard holding trial 0, the accuracy answers)."""
    backend = LocalBackend.from_config({"model": spec, "max_batch_size": 32})
    await backend.start()
    try:
        started = time.perf_counter()
        marked, marked_counts, plain, _plain_counts = await generate_texts(backend, trials, length, keys)
        print(f"generated {2 * len(trials)} texts in {time.perf_counter() - started:.0f} s", flush=True)
        with_accuracy = 0 in trials
        acc_marked = await accuracy(backend, keys[0], samples) if with_accuracy else (0, 0)
        acc_plain = await accuracy(backend, None, samples) if with_accuracy else (0, 0)
    finally:
        await backend.aclose()
    return {
        "trials": trials,
        "marked": marked,
        "marked_counts": marked_counts,
        "plain": plain,
        "acc_marked": acc_marked,
        "acc_plain": acc_plain,
    }


def merge_shards(shards: list[dict[str, Any]]) -> dict[str, Any]:
    """Merge shards' generations in trial order, adding up the accuracy counts."""
    rows = sorted(
        (t, m, c, p)
        for s in shards
        for t, m, c, p in zip(s["trials"], s["marked"], s["marked_counts"], s["plain"], strict=True)
    )
    return {
        "trials": [r[0] for r in rows],
        "marked": [r[1] for r in rows],
        "marked_counts": [r[2] for r in rows],
        "plain": [r[3] for r in rows],
        "acc_marked": [sum(s["acc_marked"][i] for s in shards) for i in (0, 1)],
        "acc_plain": [sum(s["acc_plain"][i] for s in shards) for i in (0, 1)],
    }


def chi_square(counts: np.ndarray, expected: np.ndarray, min_expected: float = 5.0) -> tuple[float, int]:
    """Return the chi-square GOF p-value and degrees of freedom, pooling bins expected below ``min_expected``."""
    keep = expected >= min_expected
    obs = np.append(counts[keep], counts[~keep].sum())
    exp = np.append(expected[keep], expected[~keep].sum())
    if exp[-1] < min_expected:  # nothing (or too little) to pool: fold it into the last kept bin
        obs, exp = np.append(obs[:-2], obs[-2:].sum()), np.append(exp[:-2], exp[-2:].sum())
    exp = exp * obs.sum() / exp.sum()
    return float(chisquare(obs, exp).pvalue), len(obs) - 1


def per_step_test(spec: str, trials: int, keys: list[bytes]) -> dict[str, Any]:
    """Watermarked and plain next-token draws on the prompts vs the model's distributions (chi-square GOF)."""
    loaded = weights.load_model(spec)
    tok = loaded.tokenizer
    expected: np.ndarray | None = None
    marked: Counter[int] = Counter()
    plain: Counter[int] = Counter()
    gen = torch.Generator().manual_seed(1234)
    prompts = [tok(prompt(t), add_special_tokens=False)["input_ids"] for t in range(trials)]
    width = max(len(ids) for ids in prompts)
    # One left-padded forward pass for every prompt: the last position predicts the next token.
    batch = torch.tensor([[0] * (width - len(ids)) + ids for ids in prompts])
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompts])
    with torch.inference_mode():
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        last = loaded.model(input_ids=batch, attention_mask=mask, position_ids=positions).logits[:, -1].float()
    for t, ids in enumerate(prompts):
        q = torch.softmax(last[t], dim=-1)
        expected = q.numpy().astype(np.float64) * len(keys) + (0 if expected is None else expected)
        candidates = torch.stack([draw_candidates(q, gen) for _ in keys])
        window = tuple(ids[-CONTEXT:])
        marked.update(sample_batch(candidates, [(k, window) for k in keys], q.shape[-1]).tolist())
        plain.update(torch.multinomial(q, len(keys), replacement=True, generator=gen).tolist())
    assert expected is not None
    vocab = expected.shape[0]
    out: dict[str, Any] = {"draws": trials * len(keys)}
    for label, counter in (("watermarked", marked), ("plain", plain)):
        counts = np.zeros(vocab)
        for token, c in counter.items():
            counts[token] = c
        out[label] = chi_square(counts, expected)
    return out


def frequency_permutation_test(a: list[list[int]], b: list[list[int]], top: int = 100, perms: int = 2000) -> float:
    """Return the permutation p-value of a chi-square distance between two groups' token frequencies."""
    vocab_counts = Counter(t for text in a + b for t in text)
    kept = {t: i for i, (t, _c) in enumerate(vocab_counts.most_common(top))}
    rows = np.zeros((len(a) + len(b), len(kept) + 1))
    for r, text in enumerate(a + b):
        for t in text:
            rows[r, kept.get(t, len(kept))] += 1

    def distance(mask: np.ndarray) -> float:
        x, y = rows[mask].sum(0), rows[~mask].sum(0)
        px, py = x / x.sum(), y / y.sum()
        pooled = (x + y) / (x.sum() + y.sum())
        return float((((px - py) ** 2) / np.maximum(pooled, 1e-12)).sum())

    mask = np.zeros(len(rows), dtype=bool)
    mask[: len(a)] = True
    observed = distance(mask)
    rng = np.random.default_rng(7)
    hits = sum(distance(rng.permutation(mask)) >= observed for _ in range(perms))
    return (hits + 1) / (perms + 1)


async def accuracy(backend: LocalBackend, key: bytes | None, samples: int) -> tuple[int, int]:
    """Return (correct, total) on the short questions, ``samples`` answers each at temperature 0.7."""
    requests = []
    for q_index, (question, _answers) in enumerate(QUESTIONS):
        request = ChatCompletionRequest(
            model="bench",
            messages=[ChatMessage(role="user", content=question + " Answer in one word.")],
            temperature=0.7,
            max_tokens=12,
            n=samples,
            seed=q_index + (0 if key is None else 5000),
        )
        request.set_watermark_key(key)
        requests.append(request)
    results = await asyncio.gather(*(backend.chat(r) for r in requests))
    correct = total = 0
    for (_question, answers), result in zip(QUESTIONS, results, strict=True):
        for choice in result.choices:
            text = (choice.message.content or "").lower()
            correct += any(a in text for a in answers.split("|"))
            total += 1
    return correct, total


async def measure(
    spec: str, trials: int, grants: int, length: int, samples: int, cache: str | None, shard: tuple[int, int]
) -> None:
    """Run the attribution, false-attribution, distribution and accuracy measurement; print its figures."""
    keys = [grant_key(i) for i in range(grants)]
    trial_keys = [keys[t % grants] for t in range(trials)]
    paths = [Path(x) for x in cache.split(",")] if cache else []
    if paths and all(path.exists() for path in paths):
        # Earlier runs' generations, e.g. shards run side by side (statistics are cheap to redo).
        data = merge_shards([json.loads(path.read_text()) for path in paths])
    else:
        index, count = shard
        data = await generate_shard(spec, [t for t in range(trials) if t % count == index], length, trial_keys, samples)
        if paths:
            paths[0].write_text(json.dumps(data))
        if count > 1:
            return  # one shard of several: merge them with --texts A,B,...
    trials = len(data["trials"])
    trial_keys = [keys[t % grants] for t in data["trials"]]
    marked_texts, marked_counts, plain_texts = data["marked"], data["marked_counts"], data["plain"]
    acc_marked, acc_plain = tuple(data["acc_marked"]), tuple(data["acc_plain"])
    tokenizer = weights.load_tokenizer(spec)

    def tokenize(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    marked_ids = [tokenize(t) for t in marked_texts]
    plain_ids = [tokenize(t) for t in plain_texts]
    # Attribution as `airlock leak trace` does it: every grant tested, Bonferroni over grants.
    attributed = true_p_small = attributed_full = 0
    true_p: list[float] = []
    wrong_small = wrong_total = 0
    for t, ids in enumerate(marked_ids):
        p = [detect(k, ids).p_value for k in keys]
        true = data["trials"][t] % grants
        true_p.append(p[true])
        true_p_small += p[true] < 1e-4
        best = min(range(grants), key=lambda g: p[g])
        hit = best == true and p[true] * grants < 1e-4
        attributed += hit
        attributed_full += hit and marked_counts[t] >= length
        others = [p[g] for g in range(grants) if g != true]
        wrong_small += sum(x < 0.01 for x in others)
        wrong_total += len(others)
    plain_any = plain_raw = 0
    for ids in plain_ids:
        p = [detect(k, ids).p_value for k in keys]
        plain_any += min(p) * grants < 0.01
        plain_raw += sum(x < 0.01 for x in p)
    full = sum(c >= length for c in marked_counts)
    scored = [detect(keys[0], ids).scored_tokens for ids in marked_ids]
    step = per_step_test(spec, trials, keys)
    freq_p = frequency_permutation_test(marked_ids, plain_ids)
    lo, hi = newcombe(acc_marked[0], acc_marked[1], acc_plain[0], acc_plain[1])

    print(f"\nmeasurement on {spec}: {trials} trials, {grants} grants, {length} tokens per text, load {loadavg()}")
    print(f"  texts reaching {length} generated tokens: {full}/{trials} (tokens generated {spread(marked_counts)})")
    print(f"  tokens scored per text (new windows, re-tokenized) min/median/max {spread(scored)}")
    print(
        f"  attribution: true grant ranked first at adjusted p < 1e-4 in {attributed}/{trials}; "
        f"raw p < 1e-4 in {true_p_small}/{trials}; true-key p median {statistics.median(true_p):.2g}, "
        f"max {max(true_p):.2g}"
    )
    print(f"  attribution among texts reaching {length} tokens: {attributed_full}/{full}")
    print(f"  false attribution, plain texts: any grant at adjusted p < 0.01 in {plain_any}/{trials} trials")
    print(f"  false attribution, plain texts: (text, grant) pairs at raw p < 0.01: {plain_raw}/{trials * grants}")
    print(f"  false attribution, watermarked texts, wrong grants: raw p < 0.01 in {wrong_small}/{wrong_total}")
    print(
        f"  per-step distribution ({step['draws']} draws, chi-square vs the model): "
        f"watermarked p = {step['watermarked'][0]:.3g} (df {step['watermarked'][1]}), "
        f"plain p = {step['plain'][0]:.3g} (df {step['plain'][1]})"
    )
    print(f"  token frequencies, watermarked vs plain texts (permutation test): p = {freq_p:.3g}")
    print(
        f"  accuracy (short questions): watermarked {acc_marked[0]}/{acc_marked[1]} "
        f"{wilson(*acc_marked)[0]:.2f}-{wilson(*acc_marked)[1]:.2f}, plain {acc_plain[0]}/{acc_plain[1]} "
        f"{wilson(*acc_plain)[0]:.2f}-{wilson(*acc_plain)[1]:.2f}; difference 95 % CI [{lo:+.3f}, {hi:+.3f}]"
    )
    report(
        "watermark",
        [
            {"figure": "attributed at p<1e-4", "value": attributed / trials, "goal": ">= 0.99"},
            {"figure": "false attribution at p<0.01 (plain)", "value": plain_any / trials, "goal": "<= 0.01"},
            {"figure": "per-step chi-square p (watermarked)", "value": step["watermarked"][0]},
            {"figure": "token frequency permutation p", "value": freq_p},
            {"figure": "accuracy difference CI", "value": [lo, hi]},
        ],
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:smollm2-135m", help="model spec (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="cost only, fewer tokens and repetitions (< 2 min)")
    parser.add_argument("--rows", type=int, default=16, help="rows per batch in the cost runs (default: %(default)s)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per row in the cost runs (default: %(default)s)")
    parser.add_argument("--reps", type=int, default=5, help="repetitions of each cost run (default: %(default)s)")
    parser.add_argument("--trials", type=int, default=0, help="run the measurement with this many trials")
    parser.add_argument("--texts", help="keep the measurement's generations in this JSON file (reused when present)")
    parser.add_argument("--shard", default="0/1", help="generate only trials t with t %% K == I (I/K), save, stop")
    parser.add_argument("--no-cost", action="store_true", help="skip the cost runs (with --trials)")
    parser.add_argument("--grants", type=int, default=20, help="grant keys in the measurement (default: %(default)s)")
    parser.add_argument("--length", type=int, default=200, help="tokens per text (default: %(default)s)")
    parser.add_argument("--samples", type=int, default=10, help="answers per question (default: %(default)s)")
    args = parser.parse_args()
    tokens, reps = (16, 3) if args.quick else (args.tokens, args.reps)
    if not args.no_cost:
        await cost_table(args.model, args.rows, tokens, reps)
    if args.trials:
        index, count = (int(x) for x in args.shard.split("/"))
        await measure(args.model, args.trials, args.grants, args.length, args.samples, args.texts, (index, count))


async def cost_table(model: str, rows: int, tokens: int, reps: int) -> None:
    """Print the cost figures: whole generation and the sampling step alone, watermarked vs plain."""
    print(
        f"model {model}, {rows} rows x {tokens} tokens, {reps} reps, "
        f"{torch.get_num_threads()} torch threads, load {loadavg()}",
        flush=True,
    )

    backend = LocalBackend.from_config({"model": model, "max_batch_size": rows})
    await backend.start()
    try:
        vocab = len(backend.tokenizer)
        end_to_end = await cost(backend, rows, tokens, reps)
    finally:
        await backend.aclose()
    step = sampling_cost(vocab, rows, reps)
    print(f"\n{'figure (min/median/max)':<44}{'plain':>20}{'watermarked':>20}{'ratio':>20}")
    print(
        f"{'generation, ms per token':<44}{spread([x * 1e3 for x in end_to_end['plain']]):>20}"
        f"{spread([x * 1e3 for x in end_to_end['watermarked']]):>20}{spread(end_to_end['ratio']):>20}"
    )
    print(
        f"{'sampling step alone, us per token':<44}{spread(step['plain']):>20}"
        f"{spread(step['watermarked']):>20}{spread(step['ratio']):>20}"
    )
    print(
        f"{'  vs an inverse-CDF plain draw, us per token':<44}{spread(step['inverse-cdf']):>20}"
        f"{spread(step['watermarked']):>20}{spread(step['ratio-cdf']):>20}"
    )
    overhead = [
        (w - c) * 1e-3 / (e * 1e3)
        for w, c, e in zip(step["watermarked"], step["inverse-cdf"], end_to_end["plain"], strict=True)
    ]
    print(f"watermark's extra sampling time over an inverse-CDF draw, share of a plain token: {spread(overhead)}")
    report(
        "watermark",
        [
            {
                "figure": "cost per token, watermarked/plain",
                "value": statistics.median(end_to_end["ratio"]),
                "goal": "<= 1.05",
            },
            {"figure": "sampling step us/token, watermarked", "value": statistics.median(step["watermarked"])},
        ],
    )


if __name__ == "__main__":
    asyncio.run(main())
