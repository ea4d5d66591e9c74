"""Interp overhead: activation reads through the sandbox + RPC versus the same reads in-process.

Everything runs in this process on one model thread. Three measurements:

1. per-job overhead: an empty job (fresh bubblewrap runner, interpreter, numpy, RPC handshake);
2. the same ``trace`` calls (read every layer's residual stream at the last token) made
   in-process and from inside a sandboxed job: per-call ms and their ratio;
3. throughput across the socket: large reads (every layer, every position) in MB/s, measured
   end to end in the runner and net of the host's forward-pass time.

    python bench/bench_interp.py [--model embedded:smollm2-135m|tiny-random] [--calls 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from airlock.interp import _runtime  # noqa: E402
from airlock.interp.run import JobSpec, run_job, runner_limits  # noqa: E402
from airlock.interp.tracing import describe, run_trace  # noqa: E402
from airlock.interp.workers import ThreadWorker  # noqa: E402

PROMPTS = [
    "The capital of France is",
    "In one sentence, what is an evaluation of a language model?",
    "Water boils at a temperature of",
    "The quick brown fox jumps over the lazy",
]

JOB = """
import time
from airlock.interp import client

def main(prompts, reads, calls, positions, big_prompts, big_calls):
    client.modules()
    small = []
    for _ in range(calls):
        started = time.perf_counter()
        client.trace(prompts, read=reads, positions=positions, logits=False)
        small.append(time.perf_counter() - started)
    big, nbytes = [], 0
    for _ in range(big_calls):
        started = time.perf_counter()
        result = client.trace(big_prompts, read=reads, logits=False)
        big.append(time.perf_counter() - started)
        nbytes += sum(a.nbytes for a in result.activations.values())
    return {"small": small, "big": big, "big_bytes": nbytes}
"""


def _limits() -> Any:
    return runner_limits(cpu_seconds=300, wall_seconds=600, memory_bytes=4096 * 2**20, log_bytes=1 << 20)


def _job(code: str, args: dict[str, Any]) -> JobSpec:
    return JobSpec(code=code, filename="bench.py", entry_point="main", args=args)


def main() -> None:
    """Run the benchmark and print absolute figures and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded:smollm2-135m")
    parser.add_argument("--calls", type=int, default=20, help="small trace calls per path")
    parser.add_argument("--jobs", type=int, default=5, help="empty jobs for the per-job overhead")
    parser.add_argument("--big-calls", type=int, default=3, help="large reads for the throughput figure")
    opts = parser.parse_args()
    os.environ.setdefault("AIRLOCK_HOME", tempfile.mkdtemp(prefix="airlock-bench-"))

    from airlock.backends import weights

    started = time.perf_counter()
    loaded = weights.load_model(opts.model)
    worker = ThreadWorker(loaded.model, loaded.tokenizer)
    info = worker.submit(lambda m, t: describe(m)).result()
    reads = [f"model.layers.{i}" for i in range(info["n_layers"])]
    big_prompts = [" ".join(["word"] * 60) + f" {i}" for i in range(16)]
    load_s = time.perf_counter() - started
    print(f"model {opts.model}: {info['n_layers']} layers, hidden {info['hidden_size']} ({load_s:.1f} s to load)")
    started = time.perf_counter()
    _runtime.ensure_runtime()
    print(f"runner runtime built in {time.perf_counter() - started:.2f} s (once per process)")

    request = {"prompts": PROMPTS, "read": reads, "positions": [-1], "logits": False}
    for _ in range(3):  # warm-up
        worker.submit(lambda m, t: run_trace(m, t, request)).result()
    in_process = []
    for _ in range(opts.calls):
        t0 = time.perf_counter()
        worker.submit(lambda m, t: run_trace(m, t, request)).result()
        in_process.append(time.perf_counter() - t0)
    big_request = {"prompts": big_prompts, "read": reads, "logits": False}
    t0 = time.perf_counter()
    reply = worker.submit(lambda m, t: run_trace(m, t, big_request)).result()
    big_in_process = time.perf_counter() - t0
    big_bytes = sum(a.nbytes for a in reply["activations"].values())

    empty = []
    for _ in range(opts.jobs):
        t0 = time.perf_counter()
        outcome = asyncio.run(run_job(_job("def main():\n    return {}\n", {}), worker, _limits()))
        empty.append(time.perf_counter() - t0)
        assert outcome.error is None, outcome.logs

    args = {
        "prompts": PROMPTS,
        "reads": reads,
        "calls": opts.calls,
        "positions": -1,
        "big_prompts": big_prompts,
        "big_calls": opts.big_calls,
    }
    t0 = time.perf_counter()
    outcome = asyncio.run(run_job(_job(JOB, args), worker, _limits(), max_result_bytes=64 * 2**20))
    job_wall = time.perf_counter() - t0
    assert outcome.error is None, (outcome.error, outcome.logs)
    value = outcome.value
    sandboxed = [float(x) for x in value["small"]]
    big = [float(x) for x in value["big"]]
    per_big_bytes = value["big_bytes"] / max(1, len(big))

    ms = 1000.0
    med_in, med_sb = statistics.median(in_process), statistics.median(sandboxed)
    print()
    print(f"per-job overhead (empty job, fresh sandbox):   median {statistics.median(empty) * ms:7.1f} ms "
          f"(min {min(empty) * ms:.1f}, max {max(empty) * ms:.1f}, {opts.jobs} jobs)")  # fmt: skip
    print(f"trace, {len(reads)} layers x {len(PROMPTS)} prompts, last token "
          f"({len(reads) * len(PROMPTS) * info['hidden_size'] * 4 / 1024:.0f} KiB):")  # fmt: skip
    print(f"  in-process                     median {med_in * ms:7.2f} ms/call")
    print(f"  sandboxed runner over RPC      median {med_sb * ms:7.2f} ms/call   ratio {med_sb / med_in:5.2f}x "
          f"(+{(med_sb - med_in) * ms:.2f} ms/call)")  # fmt: skip
    job_in_process = opts.calls * med_in
    print(f"  whole job ({opts.calls} calls + {opts.big_calls} large reads) wall {job_wall:.2f} s")
    print(f"large reads, all {len(reads)} layers x all positions x {len(big_prompts)} prompts "
          f"({per_big_bytes / 2**20:.1f} MiB per call):")  # fmt: skip
    mib = 2**20
    rate_in = big_bytes / mib / big_in_process
    print(f"  in-process                     {big_in_process * ms:7.1f} ms/call  ({rate_in:7.1f} MB/s)")
    med_big = statistics.median(big)
    rate_rpc = per_big_bytes / mib / med_big
    print(f"  sandboxed runner over RPC      {med_big * ms:7.1f} ms/call  ({rate_rpc:7.1f} MB/s end to end)")
    transport = max(med_big - big_in_process, 1e-9)
    rate_socket = per_big_bytes / mib / transport
    print(f"  socket transfer alone          {transport * ms:7.1f} ms/call  ({rate_socket:7.1f} MB/s,"
          " RPC time minus the in-process forward pass)")  # fmt: skip
    print()
    print(json.dumps({
        "model": opts.model,
        "per_job_overhead_ms": round(statistics.median(empty) * ms, 1),
        "trace_in_process_ms": round(med_in * ms, 2),
        "trace_sandboxed_ms": round(med_sb * ms, 2),
        "trace_ratio": round(med_sb / med_in, 2),
        "job_vs_in_process_ratio": round((statistics.median(empty) + opts.calls * med_sb) / job_in_process, 2),
        "large_read_mib": round(per_big_bytes / 2**20, 1),
        "throughput_end_to_end_mb_s": round(per_big_bytes / 2**20 / med_big, 1),
        "throughput_socket_mb_s": round(per_big_bytes / 2**20 / transport, 1),
    }))  # fmt: skip
    worker.close()


if __name__ == "__main__":
    main()
