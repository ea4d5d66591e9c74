"""Training steps/s through ``train_lora`` versus the same peft loop written directly, in one process.

Usage: ``python bench/bench_finetune.py [--model tiny-random] [--steps 10] [--batch-size 4] [--seq-len 64]``

Both sides train the same model on the same examples (each ~``--seq-len`` tokens), with the same
LoRA config, batch size and number of steps. Steps/s is 1 / the median step time after the first
step (model loading and tokenization excluded on both sides); the whole ``train_lora`` call is
also reported, with its fixed costs (load, tokenize, save).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import math
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from _common import report, spread
from airlock.backends.weights import load_model
from airlock.finetune.trainer import LORA_TARGET_MODULES, StepInfo, encode_example, train_lora


def _examples(n: int, seq_len: int) -> list[dict[str, Any]]:
    # Roughly seq_len tokens each: a short question and a long-ish fixed answer.
    words = max(4, seq_len - 40)
    answer = " ".join(["zebra"] * words)
    return [
        {"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": answer}]}
        for i in range(n)
    ]


def _steps_per_s(marks: list[float]) -> float:
    """Return 1 / median step time: robust to a spike from other work on a small shared machine."""
    return 1.0 / statistics.median(b - a for a, b in itertools.pairwise(marks))


def _direct(model_spec: str, examples: list[dict[str, Any]], steps: int, batch_size: int, seq_len: int) -> float:
    """Run the plain peft loop; return steps/s after the first step."""
    from peft import LoraConfig, get_peft_model

    loaded = load_model(model_spec)
    tok = loaded.tokenizer
    encoded = [encode_example(tok, ex, seq_len) for ex in examples]
    torch.manual_seed(0)
    config = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=list(LORA_TARGET_MODULES), task_type="CAUSAL_LM"
    )
    model: Any = get_peft_model(loaded.model, config)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, weight_decay=0.0)
    marks: list[float] = []
    for step in range(steps):
        chunk = [encoded[(step * batch_size + i) % len(encoded)] for i in range(batch_size)]
        width = max(len(e.input_ids) for e in chunk)
        ids = torch.full((batch_size, width), int(tok.pad_token_id), dtype=torch.long)
        labels = torch.full((batch_size, width), -100, dtype=torch.long)
        mask = torch.zeros((batch_size, width), dtype=torch.long)
        for r, e in enumerate(chunk):
            ids[r, : len(e.input_ids)] = torch.tensor(e.input_ids)
            labels[r, : len(e.labels)] = torch.tensor(e.labels)
            mask[r, : len(e.input_ids)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss.detach())
        marks.append(time.perf_counter())
    return _steps_per_s(marks)


def _airlock(
    model_spec: str, examples: list[dict[str, Any]], steps: int, batch_size: int, seq_len: int
) -> tuple[float, float]:
    """Run ``train_lora``; return (steps/s after the first step, whole call in seconds)."""
    marks: list[float] = []

    def on_step(_info: StepInfo) -> None:
        marks.append(time.perf_counter())

    n_epochs = math.ceil(steps * batch_size / len(examples))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        train_lora(
            model_spec,
            examples,
            out_dir=Path(out),
            n_epochs=n_epochs,
            batch_size=batch_size,
            max_seq_len=seq_len,
            on_step=on_step,
            should_stop=lambda: False,
        )
    total = time.perf_counter() - started
    return _steps_per_s(marks), total


def main() -> None:
    """Run both loops (alternating, ``--rounds`` times) and print the best steps/s of each and their ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:smollm2-135m", help="weights spec (e.g. tiny-random)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs per side; the best counts")
    parser.add_argument("--quick", action="store_true", help="the tiny random model, 4 steps, 3 rounds (< 2 min)")
    args = parser.parse_args()
    if args.quick:
        args.model, args.steps, args.rounds = "tiny-random", 4, 3
    if args.steps < 3:
        parser.error("--steps must be at least 3")
    examples = _examples(args.steps * args.batch_size, args.seq_len)
    threads = torch.get_num_threads()
    print(f"model={args.model} steps={args.steps} batch={args.batch_size} seq_len={args.seq_len} threads={threads}")
    # Warm-up: the first load converts/caches weights and pays import costs; neither side should.
    _direct(args.model, examples, 2, args.batch_size, args.seq_len)
    # Alternate and keep each side's best: on a small shared machine other processes' load comes
    # and goes, and best-of-N compares the two loops rather than the neighbours.
    airlock_runs: list[float] = []
    direct_runs: list[float] = []
    totals: list[float] = []
    for _ in range(args.rounds):
        rate, total = _airlock(args.model, examples, args.steps, args.batch_size, args.seq_len)
        airlock_runs.append(rate)
        totals.append(total)
        direct_runs.append(_direct(args.model, examples, args.steps, args.batch_size, args.seq_len))
        gc.collect()
    airlock, direct = max(airlock_runs), max(direct_runs)
    runs = ", ".join(f"{r:.3f}" for r in direct_runs)
    print(f"direct peft loop : {direct:8.3f} steps/s  (runs: {runs})")
    runs = ", ".join(f"{r:.3f}" for r in airlock_runs)
    print(f"train_lora       : {airlock:8.3f} steps/s  (runs: {runs})")
    print(f"train_lora whole call (load, tokenize, {args.steps} steps, save): {min(totals):.2f} s")
    print(f"ratio train_lora/direct: {airlock / direct:.3f}")
    ratios = [a / d for a, d in zip(airlock_runs, direct_runs, strict=True)]
    report(
        "finetune", [{"figure": f"train_lora / direct peft loop [{args.model}] (x)", "value": spread(ratios, "{:.3f}")}]
    )


if __name__ == "__main__":
    # peft 0.21 trips a transformers 5 deprecation warning; it says nothing about this benchmark.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    main()
