"""Aggregate generation throughput of the local backend at 1/4/16 concurrent clients vs sequential.

The baseline is one-at-a-time greedy ``model.generate`` on the same model in the same process (no
backend, no batching). Each configuration serves the same set of requests; clients run a closed
loop (send, wait for the answer, send the next). Continuous batching (newcomers join a running
batch between decode steps) is compared with static batching (they wait for the batch to drain),
also on a mixed-length workload, where continuous batching should pay.

    python bench/bench_batching.py                      # SmolLM2-135M, 32 tokens per request
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

from _common import TOPICS  # noqa: E402
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:smollm2-135m", help="model spec (default: %(default)s)")
    parser.add_argument("--tokens", type=int, default=32, help="max tokens per request (default: %(default)s)")
    parser.add_argument("--requests", type=int, default=16, help="requests per configuration (default: %(default)s)")
    parser.add_argument("--clients", default="1,4,16", help="concurrency levels (default: %(default)s)")
    parser.add_argument("--no-static", action="store_true", help="skip the static-batching comparison")
    parser.add_argument("--mixed", default="8,64,16,32", help="max tokens cycled in the mixed-length run ('' to skip)")
    args = parser.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    mixed = [int(t) for t in args.mixed.split(",")] if args.mixed else []
    mixed_clients = 4 if 4 in levels else levels[-1]
    print(
        f"model {args.model}, {args.requests} requests x {args.tokens} tokens, {torch.get_num_threads()} torch threads"
    )

    results = [sequential_generate(args.model, args.requests, args.tokens)]
    by_key: dict[str, list[Result]] = {}
    for continuous in [True] if args.no_static else [True, False]:
        config = {"model": args.model, "max_batch_size": max(levels), "continuous_batching": continuous}
        backend = LocalBackend.from_config(config)
        await backend.start()
        try:
            await backend.chat(request(0, 4))  # warm-up: first calls allocate and pick kernels
            for c in levels:
                if c == 1 and not continuous:
                    continue  # one client: static and continuous batching are the same thing
                label = f"backend, {c} client(s)" if continuous else f"  static batching, {c}"
                result = await closed_loop(backend, c, args.requests, args.tokens, label)
                by_key.setdefault(f"{c}", []).append(result)
            if mixed:
                label = f"mixed {'continuous' if continuous else 'static'}, {mixed_clients}"
                by_key.setdefault("mixed", []).append(
                    await closed_loop(backend, mixed_clients, args.requests, mixed, label)
                )
        finally:
            await backend.aclose()  # its thread exits: the next backend runs alone
    for key in [*map(str, levels), "mixed"]:
        results += by_key.get(key, [])

    base = results[0].rate
    print(f"\n{'configuration':<28}{'tokens':>8}{'seconds':>9}{'tok/s':>9}{'vs seq':>8}{'max rows':>10}")
    for r in results:
        print(f"{r.label:<28}{r.tokens:>8}{r.seconds:>9.2f}{r.rate:>9.1f}{r.rate / base:>7.2f}x{r.max_rows:>10}")


if __name__ == "__main__":
    asyncio.run(main())
