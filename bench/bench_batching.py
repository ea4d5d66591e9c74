"""Aggregate generation throughput of the local backend at 1/4/16 concurrent clients vs sequential.

The baseline is one-at-a-time greedy ``model.generate`` on the same model in the same process (no
backend, no batching). Each configuration serves the same set of requests; clients run a closed
loop (send, wait for the answer, send the next). Continuous batching (newcomers join a running
batch between decode steps) is compared with static batching (they wait for the batch to drain).

    python bench/bench_batching.py                      # SmolLM2-135M, 32 tokens per request
    python bench/bench_batching.py --model tiny-random  # plumbing only: a 2-layer random model
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
# Share the converted-model cache with the test suite unless told otherwise.
os.environ.setdefault("AIRLOCK_MODEL_CACHE", str(REPO / ".cache" / "models"))

import torch  # noqa: E402

from airlock.backends.local import LocalBackend  # noqa: E402
from airlock.backends.protocol import ChatCompletionRequest, ChatMessage  # noqa: E402

TOPICS = [
    "a lighthouse keeper",
    "the history of bread",
    "how volcanoes form",
    "a robot learning to paint",
    "the water cycle",
    "a city under the sea",
    "why the sky is blue",
    "a journey across a desert",
    "the life of a honeybee",
    "an old clockmaker",
    "how bridges are built",
    "a winter festival",
    "the moons of Jupiter",
    "a friendly dragon",
    "the first printing press",
    "a garden in spring",
]


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


def sequential_generate(backend: LocalBackend, n: int, max_tokens: int) -> Result:
    """Baseline: plain transformers greedy ``generate``, one request at a time."""
    model, tok = backend.model, backend.tokenizer
    total = 0
    started = time.perf_counter()
    for i in range(n):
        messages = [m.model_dump(exclude_none=True) for m in request(i, max_tokens).messages]
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tok(text, add_special_tokens=False, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(
                **ids,
                max_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
        # Count like the backend does: up to and including the end-of-sequence token.
        for token in out[0, ids["input_ids"].shape[1] :].tolist():
            total += 1
            if token in backend.eos_token_ids:
                break
    return Result("sequential generate()", total, time.perf_counter() - started)


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
    parser.add_argument(
        "--mixed", default="8,64,16,32", help="max tokens cycled in the mixed-length run (default: %(default)s)"
    )
    args = parser.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    max_batch = max(levels)

    print(
        f"model {args.model}, {args.requests} requests x {args.tokens} tokens, torch threads {torch.get_num_threads()}"
    )
    continuous = LocalBackend.from_config({"model": args.model, "max_batch_size": max_batch})
    static = LocalBackend.from_config({"model": args.model, "max_batch_size": max_batch, "continuous_batching": False})
    await continuous.start()
    await static.start()
    try:
        # Warm up both paths (first calls allocate and pick kernels).
        await continuous.chat(request(0, 4))
        await static.chat(request(0, 4))
        sequential_generate(continuous, 1, 4)

        results = [sequential_generate(continuous, args.requests, args.tokens)]
        for c in levels:
            results.append(await closed_loop(continuous, c, args.requests, args.tokens, f"backend, {c} client(s)"))
            if c > 1 and not args.no_static:
                results.append(await closed_loop(static, c, args.requests, args.tokens, f"  static batching, {c}"))
        # Unequal lengths are where continuous batching should pay: a short request's slot is
        # refilled at once instead of idling until the longest request of its batch finishes.
        mixed = [int(t) for t in args.mixed.split(",")] if args.mixed else []
        if mixed and not args.no_static:
            clients = 4 if 4 in levels else levels[-1]
            for backend, name in ((continuous, "continuous"), (static, "static")):
                label = f"mixed {name}, {clients}"
                results.append(await closed_loop(backend, clients, args.requests, mixed, label))
    finally:
        await continuous.aclose()
        await static.aclose()

    base = results[0].rate
    print(f"\n{'configuration':<28}{'tokens':>8}{'seconds':>9}{'tok/s':>9}{'vs seq':>8}{'max rows':>10}")
    for r in results:
        print(f"{r.label:<28}{r.tokens:>8}{r.seconds:>9.2f}{r.rate:>9.1f}{r.rate / base:>7.2f}x{r.max_rows:>10}")


if __name__ == "__main__":
    asyncio.run(main())
