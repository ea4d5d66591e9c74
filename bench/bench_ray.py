"""The Ray worker plane's cost: a model worker on a Ray node vs the same backend in-process, and jobs on Ray.

Starts its own Ray cluster on this machine (a head with no work and one node holding the weights,
with ``ray start``, removed at the end), then measures in one run, interleaved and repeated:

1. single-stream tokens/s of the local backend in this process vs a :class:`RayModelBackend`
   whose model worker actor holds the same weights on the Ray node (goal >= 0.9x);
2. the latency one actor call adds: p50 of an empty actor method from the gateway's event loop
   (goal <= 1 ms);
3. a LoRA fine-tuning run in this process vs the same run as a Ray task on the node (goal >= 0.95x).

    python bench/bench_ray.py [--quick] [--model tiny-random|embedded:smollm2-135m]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._common import percentile, report, spread  # noqa: E402

from airlock.backends.protocol import ChatCompletionRequest, ChatMessage  # noqa: E402
from airlock.cluster.placement import placement_of, weights_resource  # noqa: E402
from airlock.config import Settings  # noqa: E402
from tests.cluster.raycluster import start_cluster  # noqa: E402

EXAMPLES = [
    {"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]}
    for i in range(8)
]


def _request(model: str, tokens: int) -> ChatCompletionRequest:
    return ChatCompletionRequest(
        model=model, messages=[ChatMessage(role="user", content="Tell me a story.")], max_tokens=tokens, temperature=0.0
    )


async def _tokens_per_s(backend: Any, model: str, tokens: int) -> float:
    started = time.perf_counter()
    result = await backend.chat(_request(model, tokens))
    elapsed = time.perf_counter() - started
    return (result.usage.completion_tokens if result.usage else 0) / elapsed


async def _serving(model: str, settings: Settings, rounds: int, tokens: int, pings: int) -> dict[str, list[float]]:
    from airlock.backends.local import LocalBackend
    from airlock.cluster.worker import RayModelBackend

    config = {"model": model, "seed": 0}
    local = LocalBackend.from_config(config)
    await local.start()
    remote = RayModelBackend(config, settings)
    await remote.start()
    out: dict[str, list[float]] = {"inprocess": [], "ray": [], "hop_ms": []}
    try:
        for backend in (local, remote):  # warm-up
            await _tokens_per_s(backend, model, tokens)
        for i in range(rounds):
            # Interleaved, alternating which goes first, so drift in the machine's load hits both alike.
            order = [("inprocess", local), ("ray", remote)]
            for name, backend in order if i % 2 == 0 else order[::-1]:
                out[name].append(await _tokens_per_s(backend, model, tokens))
            for _ in range(pings):
                started = time.perf_counter()
                await remote.handle.ping.remote()
                out["hop_ms"].append((time.perf_counter() - started) * 1000)
    finally:
        await local.aclose()
    return out


def _train(model: str, steps_epochs: int, device: str = "cpu") -> float:
    """Run a short LoRA fine-tune in the calling process; return its wall time in seconds."""
    from airlock.finetune.trainer import train_lora

    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        train_lora(model, EXAMPLES, out_dir=Path(out), n_epochs=steps_epochs, batch_size=1, device=device)
        return time.perf_counter() - started


def _finetune(model: str, rounds: int, epochs: int) -> dict[str, list[float]]:
    import ray

    task = ray.remote(_train).options(max_retries=0, **placement_of({"model": model}).options())
    out: dict[str, list[float]] = {"inprocess": [], "ray": []}
    _train(model, 1)  # warm-up: weights cached, kernels loaded
    ray.get(task.remote(model, 1))
    for i in range(rounds):
        order = ["inprocess", "ray"] if i % 2 == 0 else ["ray", "inprocess"]
        for name in order:
            if name == "inprocess":
                out[name].append(_train(model, epochs))
            else:
                # Timed from submission to result: placement, the hop and the task's own run.
                started = time.perf_counter()
                ray.get(task.remote(model, epochs))
                out[name].append(time.perf_counter() - started)
    return out


def main() -> None:
    """Start the cluster, measure, print the table and report the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds (under 2 minutes)")
    parser.add_argument("--model", default="tiny-random")
    opts = parser.parse_args()
    rounds, tokens, pings, ft_rounds, epochs = (3, 32, 50, 1, 2) if opts.quick else (7, 64, 200, 3, 4)
    os.environ.setdefault("AIRLOCK_MODEL_CACHE", str(REPO / ".cache" / "models"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Ray's worker on the node gets one core; this process's torch gets one too, as on the node.
    import torch

    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    started = time.perf_counter()
    cluster = start_cluster({"node": {weights_resource(opts.model): 1}})
    try:
        import ray

        settings = Settings(executor="ray", ray_address=cluster.address)
        ray.init(address=cluster.address, namespace=settings.ray_namespace, log_to_driver=False)
        print(f"cluster up in {time.perf_counter() - started:.1f} s; model {opts.model}")
        serve = asyncio.run(_serving(opts.model, settings, rounds, tokens, pings))
        ft = _finetune(opts.model, ft_rounds, epochs)
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        cluster.stop()
    tps_ratio = statistics.median(serve["ray"]) / statistics.median(serve["inprocess"])
    ft_ratio = statistics.median(ft["inprocess"]) / statistics.median(ft["ray"])
    hop_p50 = percentile(serve["hop_ms"], 0.5)
    print(f"single-stream tokens/s, in-process: {spread(serve['inprocess'])}")
    print(f"single-stream tokens/s, Ray model worker: {spread(serve['ray'])}  ratio {tps_ratio:.2f}x (goal >= 0.9x)")
    print(f"actor hop: p50 {hop_p50:.2f} ms, p90 {percentile(serve['hop_ms'], 0.9):.2f} ms (goal p50 <= 1 ms)")
    print(f"fine-tune wall s, in-process: {spread(ft['inprocess'])}; on Ray: {spread(ft['ray'])}")
    print(f"fine-tune throughput on Ray vs in-process: {ft_ratio:.2f}x (goal >= 0.95x)")
    print(f"total {time.perf_counter() - started:.0f} s")
    report(
        "ray",
        [
            {"figure": "model worker tokens/s vs in-process", "value": f"{tps_ratio:.2f}x", "goal": ">= 0.9x"},
            {"figure": "actor hop p50", "value": f"{hop_p50:.2f} ms", "goal": "<= 1 ms"},
            {"figure": "fine-tune on Ray vs in-process", "value": f"{ft_ratio:.2f}x", "goal": ">= 0.95x"},
        ],
    )


if __name__ == "__main__":
    main()
