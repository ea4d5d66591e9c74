"""Airlock's GPU path in one run: the local backend, a short LoRA fine-tune and an interp trace, with throughput.

Run by ``scripts/gpu-check.sh`` on an NVIDIA machine (``--device cuda``, bfloat16 where the GPU has
it); ``--device cpu --model tiny-random`` runs the same steps anywhere (the tests do).

    python scripts/gpu_check.py [--device cuda] [--model embedded:smollm2-135m] [--tokens 128] [--steps 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _check_device(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            sys.exit(f"gpu-check: torch {torch.__version__} sees no CUDA device (is this the CUDA build?)")
        return f"{torch.cuda.get_device_name(0)} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    return f"cpu (torch {torch.__version__})"


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


async def _serve(model: str, device: str, dtype: str, tokens: int, streams: int) -> dict[str, Any]:
    """Load the local backend on ``device`` and time single-stream and concurrent generation."""
    from airlock.backends.local import LocalBackend
    from airlock.backends.protocol import ChatCompletionRequest, ChatMessage

    started = time.perf_counter()
    backend = LocalBackend.from_config({"model": model, "device": device, "dtype": dtype, "seed": 0})
    await backend.start()
    load_s = time.perf_counter() - started

    def request(i: int) -> ChatCompletionRequest:
        return ChatCompletionRequest(
            model=model,
            messages=[ChatMessage(role="user", content=f"Count slowly from {i}.")],
            max_tokens=tokens,
            temperature=0.0,
        )

    try:
        await backend.chat(request(0))  # warm-up (kernels, caches)
        t0 = time.perf_counter()
        one = await backend.chat(request(1))
        single_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        many = await asyncio.gather(*(backend.chat(request(i)) for i in range(streams)))
        batch_s = time.perf_counter() - t0
    finally:
        await backend.aclose()
    generated = sum(r.usage.completion_tokens for r in many if r.usage)
    return {
        "load_s": round(load_s, 2),
        "single_stream_tokens_per_s": round((one.usage.completion_tokens if one.usage else 0) / single_s, 1),
        "concurrent_streams": streams,
        "concurrent_tokens_per_s": round(generated / batch_s, 1),
    }


def _finetune(model: str, device: str, steps: int) -> dict[str, Any]:
    """Train a LoRA adapter for ``steps`` optimizer steps on ``device``; return steps/s and tokens/s."""
    from airlock.finetune.trainer import train_lora, training_dtype

    examples = [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "content": str(2 * i)},
            ]
        }
        for i in range(steps)
    ]
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        result = train_lora(model, examples, out_dir=Path(out), n_epochs=1, batch_size=1, device=device)
        _sync(device)
        elapsed = time.perf_counter() - started
    return {
        "dtype": training_dtype(device),
        "steps": result.steps,
        "steps_per_s": round(result.steps / elapsed, 2),
        "trained_tokens_per_s": round(result.trained_tokens / elapsed, 1),
        "final_train_loss": round(result.final_train_loss, 4),
    }


def _interp(model: str, device: str, dtype: str, calls: int) -> dict[str, Any]:
    """Read every layer's residual stream through the interp tracer on ``device``; return calls/s."""
    from airlock.backends import weights
    from airlock.interp.tracing import describe, run_trace
    from airlock.interp.workers import ThreadWorker

    loaded = weights.load_model(model, device=device, dtype=dtype)
    worker = ThreadWorker(loaded.model, loaded.tokenizer)
    try:
        info = worker.submit(lambda m, t: describe(m)).result()
        reads = [f"model.layers.{i}" for i in range(info["n_layers"])]
        request = {"prompts": ["The capital of France is", "Water boils at"], "read": reads, "positions": [-1]}
        reply = worker.submit(lambda m, t: run_trace(m, t, request)).result()  # warm-up, and a shape check
        if not reply:
            raise RuntimeError("interp trace returned nothing")
        started = time.perf_counter()
        for _ in range(calls):
            worker.submit(lambda m, t: run_trace(m, t, request)).result()
        elapsed = time.perf_counter() - started
    finally:
        worker.close()
    return {"layers_read": len(reads), "calls": calls, "trace_calls_per_s": round(calls / elapsed, 1)}


def main(argv: list[str] | None = None) -> int:
    """Run the three checks and print their figures as JSON (one object)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="embedded:smollm2-135m")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per generation")
    parser.add_argument("--streams", type=int, default=16, help="concurrent generations")
    parser.add_argument("--steps", type=int, default=20, help="LoRA training steps")
    parser.add_argument("--calls", type=int, default=20, help="interp trace calls")
    opts = parser.parse_args(argv)
    from airlock.finetune.trainer import training_dtype

    dtype = training_dtype(opts.device)
    report: dict[str, Any] = {"device": _check_device(opts.device), "model": opts.model, "dtype": dtype}
    report["serve"] = asyncio.run(_serve(opts.model, opts.device, dtype, opts.tokens, opts.streams))
    print(f"local backend: {json.dumps(report['serve'])}", flush=True)
    report["finetune"] = _finetune(opts.model, opts.device, opts.steps)
    print(f"LoRA fine-tune: {json.dumps(report['finetune'])}", flush=True)
    report["interp"] = _interp(opts.model, opts.device, dtype, opts.calls)
    print(f"interp trace: {json.dumps(report['interp'])}", flush=True)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
