"""Aggregate generation throughput of the local backend at 1/4/16 concurrent clients against one client.

The baseline is the same backend with one client, run in the same rounds (the order alternates;
``--hf-generate`` adds one-at-a-time Hugging Face ``generate`` for reference). Each configuration
serves the same set of requests; clients run a closed
loop (send, wait for the answer, send the next). Continuous batching (newcomers join a running
batch between decode steps) is compared with static batching (they wait for the batch to drain),
also on a mixed-length workload, where continuous batching should pay.

    python bench/bench_batching.py                      # SmolLM2-135M, 32 tokens per request
    python bench/bench_batching.py --quick              # 16 tokens, continuous batching only
    python bench/bench_batching.py --model tiny-random  # plumbing only: a 2-layer random model

Only one thread runs torch at any time (the baseline's thread exits before the backends start,
and the backends run one after the other): on a small CPU every live thread that has run torch
ops keeps an OpenMP team, and surplus teams slow every other one down (see backends/local/engine.py).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))
# Share the converted-model cache with the test suite unless told otherwise.
os.environ.setdefault("AIRLOCK_MODEL_CACHE", str(REPO / ".cache" / "models"))

import torch  # noqa: E402

from _common import TOPICS, loadavg, report, spread  # noqa: E402
from airlock.backends import weights  # noqa: E402
from airlock.backends.local import LocalBackend  # noqa: E402
from airlock.backends.protocol import ChatCompletionRequest, ChatMessage  # noqa: E402


@dataclass
class Result:
    label: str
    tokens: int
    seconds: float
    max_rows: int = 1

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds


def request(i: int, max_tokens: int) -> ChatCompletionRequest:
    topic = TOPICS[i % len(TOPICS)]
    return ChatCompletionRequest(
        model="bench",
        messages=[ChatMessage(role="user", content=f"Write a long, detailed paragraph about {topic}.")],
        temperature=0,
        max_tokens=max_tokens,
    )


def sequential_generate(model_spec: str, n: int, max_tokens: int) -> Result:
    """Baseline: plain transformers greedy ``generate``, one request at a time, in a thread that then exits."""
    box: list[Result] = []

    def run() -> None:
        loaded = weights.load_model(model_spec)
        model: Any = loaded.model  # transformers' stubs type generate() oddly
        tok = loaded.tokenizer
        eos = {tok.eos_token_id, model.generation_config.eos_token_id}

        def one(i: int, budget: int) -> int:
            messages = [m.model_dump(exclude_none=True) for m in request(i, budget).messages]
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            ids = tok(text, add_special_tokens=False, return_tensors="pt")
            with torch.inference_mode():
                out = model.generate(**ids, max_new_tokens=budget, do_sample=False, pad_token_id=tok.pad_token_id)
            # Count like the backend does: up to and including the end-of-sequence token.
            count = 0
            for token in out[0, ids["input_ids"].shape[1] :].tolist():
                count += 1
                if token in eos:
                    break
            return count

        one(0, 4)  # warm-up
        started = time.perf_counter()
        total = sum(one(i, max_tokens) for i in range(n))
        box.append(Result("sequential generate()", total, time.perf_counter() - started))

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    return box[0]


async def closed_loop(backend: LocalBackend, clients: int, n: int, max_tokens: int | list[int], label: str) -> Result:
    """``clients`` tasks each send the next request as soon as their previous one finished."""
    budgets = max_tokens if isinstance(max_tokens, list) else [max_tokens]
    pending = list(range(n))
    tokens = 0
    backend.stats.max_batch_rows_seen = 0

    async def client() -> None:
        nonlocal tokens
        while pending:
            i = pending.pop(0)
            result = await backend.chat(request(i, budgets[i % len(budgets)]))
            tokens += result.usage.completion_tokens

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return Result(label, tokens, time.perf_counter() - started, backend.stats.max_batch_rows_seen)


async def main() -> None:
    """Measure each concurrency level in rounds (alternating order) and print ratios to one client."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds of 16 tokens, no static/HF runs (< 2 min)")
    parser.add_argument("--model", default="embedded:smollm2-135m", help="model spec (default: %(default)s)")
    parser.add_argument("--tokens", type=int, default=None, help="max tokens per request (default 32; 16 quick)")
    parser.add_argument("--requests", type=int, default=16, help="requests per configuration (default: %(default)s)")
    parser.add_argument("--clients", default="1,4,16", help="concurrency levels (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default: %(default)s)")
    parser.add_argument("--no-static", action="store_true", help="skip the static-batching comparison")
    parser.add_argument("--hf-generate", action="store_true", help="also time sequential HF generate()")
    parser.add_argument("--mixed", default="8,64,16,32", help="max tokens cycled in the mixed-length run ('' to skip)")
    args = parser.parse_args()
    tokens = args.tokens or (16 if args.quick else 32)
    levels = [int(c) for c in args.clients.split(",")]
    if 1 not in levels:
        levels.insert(0, 1)  # the baseline: one client on the same backend
    mixed = [int(t) for t in args.mixed.split(",")] if args.mixed and not args.quick else []
    mixed_clients = 4 if 4 in levels else levels[-1]
    static = not (args.no_static or args.quick)
    print(f"model {args.model}, {args.requests} requests x {tokens} tokens, {torch.get_num_threads()} torch threads")
    extra: list[Result] = []
    if args.hf_generate:
        extra.append(sequential_generate(args.model, args.requests, tokens))
    rates: dict[str, list[float]] = {}
    rows_seen: dict[str, int] = {}
    for continuous in [True, False] if static else [True]:
        config = {"model": args.model, "max_batch_size": max(levels), "continuous_batching": continuous}
        backend = LocalBackend.from_config(config)
        await backend.start()
        try:
            await backend.chat(request(0, 4))  # warm-up: first calls allocate and pick kernels
            runs = [c for c in levels if continuous or c != 1]
            for r in range(args.rounds):
                for c in runs if r % 2 == 0 else list(reversed(runs)):
                    label = f"{c} client(s)" if continuous else f"static batching, {c}"
                    result = await closed_loop(backend, c, args.requests, tokens, label)
                    rates.setdefault(label, []).append(result.rate)
                    rows_seen[label] = max(rows_seen.get(label, 0), result.max_rows)
                if mixed:
                    label = f"mixed {'continuous' if continuous else 'static'}, {mixed_clients}"
                    result = await closed_loop(backend, mixed_clients, args.requests, mixed, label)
                    rates.setdefault(label, []).append(result.rate)
                    rows_seen[label] = max(rows_seen.get(label, 0), result.max_rows)
        finally:
            await backend.aclose()  # its thread exits: the next backend runs alone
    base = rates["1 client(s)"]
    print(f"\n{args.rounds} rounds, load {loadavg()}")
    print(f"{'configuration':<28}{'tok/s (min/med/max)':>24}{'vs 1 client (per round)':>28}{'max rows':>10}")
    figures = []
    for label, values in rates.items():
        # Ratios pair each run with the one-client run of its own round.
        ratio = [v / b for v, b in zip(values, base, strict=False)]
        print(f"{label:<28}{spread(values, '{:.1f}'):>24}{spread(ratio, '{:.2f}'):>27}x{rows_seen[label]:>10}")
        if label.endswith("client(s)") and label != "1 client(s)":
            figures.append({"figure": f"backend {label} / 1 client (x)", "value": spread(ratio, "{:.2f}")})
    for r in extra:
        print(f"{r.label:<28}{r.rate:>24.1f}  (one run, HF generate, no backend)")
    figures.insert(0, {"figure": "backend 1 client (tok/s)", "value": spread(base, "{:.1f}")})
    report("batching", figures)


if __name__ == "__main__":
    asyncio.run(main())
