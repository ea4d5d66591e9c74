"""Interp cost: sandboxed runners against in-process calls, interleaved, and the job path through a gateway.

Four measurements, each repeated over rounds whose order alternates (min/median/max of the rounds):

1. runner start: an empty job in a fresh runner against one in a warm runner from a pool (the
   gateway's default): the time until the runner took its job, and the whole job's wall time;
2. ``trace`` calls (every layer's residual stream at the last token): a block of in-process
   calls, then the same calls from inside a sandboxed job (warm runner), per-call median of each
   block and their difference and ratio;
3. large reads (every layer, every position): in-process against sandboxed end to end, and the
   socket transfer alone (the sandboxed read minus the in-process forward pass);
4. the job path through ``airlock serve`` (a separate process, SQLite, the tiny random model):
   submit to running (the queued job's pickup, from the gateway's timestamps), pickup to a ready
   sandbox (the job's ``runner_ready_ms``) and submit to result as the client sees it.

A difference (sandboxed minus in-process) is a figure only when it is positive in every round;
otherwise the noise of this machine is larger than the cost, and the benchmark says so instead.

    python bench/bench_interp.py [--quick] [--model embedded:smollm2-135m|tiny-random] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import loadavg, percentile, report, spread
from _gateway import LOCAL_MODEL, REPO, database, prepare_local_lab, serve

sys.path.insert(0, str(REPO / "src"))
os.environ.setdefault("AIRLOCK_MODEL_CACHE", str(REPO / ".cache" / "models"))

from airlock.interp import _runtime
from airlock.interp.pool import RunnerPool
from airlock.interp.run import JobSpec, RunOutcome, run_job, runner_limits
from airlock.interp.tracing import describe, run_trace
from airlock.interp.workers import ThreadWorker

PROMPTS = [
    "The capital of France is",
    "In one sentence, what is an evaluation of a language model?",
    "Water boils at a temperature of",
    "The quick brown fox jumps over the lazy",
]

EMPTY = "def main():\n    return {}\n"

JOB = """
import time
from airlock.interp import client

def main(prompts, reads, calls, big_prompts):
    client.modules()
    client.trace(prompts, read=reads, positions=-1, logits=False)  # warm-up
    small = []
    for _ in range(calls):
        started = time.perf_counter()
        client.trace(prompts, read=reads, positions=-1, logits=False)
        small.append(time.perf_counter() - started)
    started = time.perf_counter()
    result = client.trace(big_prompts, read=reads, logits=False)
    big = time.perf_counter() - started
    return {"small": small, "big": big, "big_bytes": sum(a.nbytes for a in result.activations.values())}
"""

MS = 1000.0


def _limits() -> Any:
    return runner_limits(cpu_seconds=300, wall_seconds=600, memory_bytes=4096 * 2**20, log_bytes=1 << 20)


def _run(worker: ThreadWorker, code: str, args: dict[str, Any], pool: RunnerPool | None) -> tuple[RunOutcome, float]:
    spec = JobSpec(code=code, filename="bench.py", entry_point="main", args=args)
    started = time.perf_counter()
    outcome = asyncio.run(run_job(spec, worker, _limits(), max_result_bytes=256 * 2**20, pool=pool))
    wall = time.perf_counter() - started
    if outcome.error is not None:
        raise RuntimeError(f"bench job failed: {outcome.error} {outcome.logs[-2000:]}")
    return outcome, wall


def _wait_warm(pool: RunnerPool, timeout: float = 60.0) -> None:
    """Wait until the pool's runner is up and waiting (what a gateway between jobs has)."""
    deadline = time.monotonic() + timeout
    while pool.warm(_limits()) < pool.size and time.monotonic() < deadline:
        time.sleep(0.01)
    with pool._lock:  # the runners themselves: ready means they asked for a job
        runners = list(pool._warm.get(_limits(), []))
    for runner in runners:
        runner.ready(max(deadline - time.monotonic(), 0.0))


def difference(label: str, sandboxed: Sequence[float], in_process: Sequence[float], unit: str = "ms") -> str:
    """Return ``min/median/max`` of the per-round differences, or why there is no figure (a negative round)."""
    diffs = [s - i for s, i in zip(sandboxed, in_process, strict=True)]
    negative = sum(1 for d in diffs if d <= 0)
    if negative:
        return f"no figure: the difference was negative in {negative} of {len(diffs)} rounds (noise > cost)"
    return f"{spread(diffs, '{:.2f}')} {unit}"


def gather(rounds: int, steps: dict[str, Callable[[], float]]) -> dict[str, list[float]]:
    """Run every step once per round, in alternating order; return each step's values."""
    names = list(steps)
    values: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            values[name].append(steps[name]())
    return values


def local_part(opts: argparse.Namespace) -> list[dict[str, Any]]:
    """Parts 1-3: runner start, trace calls and large reads, in this process on one model thread."""
    from airlock.backends import weights

    started = time.perf_counter()
    loaded = weights.load_model(opts.model)
    worker = ThreadWorker(loaded.model, loaded.tokenizer)
    info = worker.submit(lambda m, t: describe(m)).result()
    print(f"model {opts.model}: {info['n_layers']} layers, hidden {info['hidden_size']} "
          f"({time.perf_counter() - started:.1f} s to load)")  # fmt: skip
    started = time.perf_counter()
    _runtime.ensure_runtime()
    print(f"runner runtime built in {time.perf_counter() - started:.2f} s (once per process)")
    pool = RunnerPool(1, idle_s=600)
    rows: list[dict[str, Any]] = []
    try:
        # 1. Runner start: fresh against warm, alternating.
        _run(worker, EMPTY, {}, None)  # warm-up: caches of the interpreter's files
        pool.prime(_limits())
        ready: dict[str, list[float]] = {"fresh": [], "warm": []}
        wall: dict[str, list[float]] = {"fresh": [], "warm": []}

        def empty(kind: str) -> float:
            if kind == "warm":
                _wait_warm(pool)
            outcome, seconds = _run(worker, EMPTY, {}, pool if kind == "warm" else None)
            ready[kind].append(float(outcome.usage["runner_ready_ms"]))
            wall[kind].append(seconds * MS)
            return seconds

        gather(opts.jobs, {"fresh": lambda: empty("fresh"), "warm": lambda: empty("warm")})
        ratio = [f / w for f, w in zip(ready["fresh"], ready["warm"], strict=True)]
        print(f"\n1. runner start ({opts.jobs} rounds, load {loadavg()})")
        print(f"   ready for its job, fresh runner   {spread(ready['fresh'], '{:.1f}')} ms")
        print(f"   ready for its job, warm runner    {spread(ready['warm'], '{:.1f}')} ms   "
              f"fresh/warm {spread(ratio, '{:.1f}')}x")  # fmt: skip
        print(f"   empty job wall, fresh / warm      {spread(wall['fresh'], '{:.0f}')} / "
              f"{spread(wall['warm'], '{:.0f}')} ms")  # fmt: skip
        rows += [
            {"figure": "interp runner ready, fresh (ms)", "value": spread(ready["fresh"], "{:.1f}")},
            {"figure": "interp runner ready, warm (ms)", "value": spread(ready["warm"], "{:.1f}"), "goal": "<= 150"},
            {"figure": "interp empty job wall, warm (ms)", "value": spread(wall["warm"], "{:.0f}")},
        ]

        # 2 and 3. Trace calls and large reads: in-process block, then sandboxed block, alternating.
        reads = [f"model.layers.{i}" for i in range(info["n_layers"])]
        big_prompts = [" ".join(["word"] * 60) + f" {i}" for i in range(16)]
        request = {"prompts": PROMPTS, "read": reads, "positions": [-1], "logits": False}
        big_request = {"prompts": big_prompts, "read": reads, "logits": False}
        for _ in range(3):  # warm-up
            worker.submit(lambda m, t: run_trace(m, t, request)).result()
        in_small: list[float] = []
        in_big: list[float] = []
        sb_small: list[float] = []
        sb_big: list[float] = []
        big_bytes: list[int] = []

        def in_process() -> float:
            times = []
            for _ in range(opts.calls):
                t0 = time.perf_counter()
                worker.submit(lambda m, t: run_trace(m, t, request)).result()
                times.append(time.perf_counter() - t0)
            in_small.append(statistics.median(times) * MS)
            t0 = time.perf_counter()
            worker.submit(lambda m, t: run_trace(m, t, big_request)).result()
            in_big.append((time.perf_counter() - t0) * MS)
            return in_small[-1]

        def sandboxed() -> float:
            _wait_warm(pool)
            args = {"prompts": PROMPTS, "reads": reads, "calls": opts.calls, "big_prompts": big_prompts}
            outcome, _seconds = _run(worker, JOB, args, pool)
            sb_small.append(statistics.median(float(x) for x in outcome.value["small"]) * MS)
            sb_big.append(float(outcome.value["big"]) * MS)
            big_bytes.append(int(outcome.value["big_bytes"]))
            return sb_small[-1]

        gather(opts.rounds, {"in-process": in_process, "sandboxed": sandboxed})
        kib = len(reads) * len(PROMPTS) * info["hidden_size"] * 4 / 1024
        trace_ratio = [s / i for s, i in zip(sb_small, in_small, strict=True)]
        print(f"\n2. trace, {len(reads)} layers x {len(PROMPTS)} prompts, last token ({kib:.0f} KiB), "
              f"{opts.calls} calls per block, {opts.rounds} rounds (load {loadavg()})")  # fmt: skip
        print(f"   in-process                  {spread(in_small, '{:.2f}')} ms/call")
        print(f"   sandboxed runner over RPC   {spread(sb_small, '{:.2f}')} ms/call   "
              f"ratio {spread(trace_ratio, '{:.2f}')}x")  # fmt: skip
        added = difference("trace", sb_small, in_small, "ms/call")
        print(f"   added by the sandbox        {added}")
        mib = big_bytes[0] / 2**20
        e2e = [mib / (b / MS) for b in sb_big]
        print(f"\n3. large reads, all {len(reads)} layers x all positions x {len(big_prompts)} prompts ({mib:.1f} MiB)")
        print(f"   in-process                  {spread(in_big, '{:.0f}')} ms/call")
        print(f"   sandboxed, end to end       {spread(sb_big, '{:.0f}')} ms/call   ({spread(e2e, '{:.1f}')} MB/s)")
        transfer = difference("transfer", sb_big, in_big, "ms")
        socket_rate = "-"
        if not transfer.startswith("no figure"):
            rates = [mib / ((s - i) / MS) for s, i in zip(sb_big, in_big, strict=True)]
            socket_rate = f"{spread(rates, '{:.1f}')} MB/s"
            transfer = f"{transfer}  ({socket_rate})"
        print(f"   socket transfer alone       {transfer}")
        rows += [
            {"figure": "interp trace sandboxed/in-process (x)", "value": spread(trace_ratio, "{:.2f}")},
            {"figure": "interp trace added per call (ms)", "value": added},
            {"figure": "interp large read end to end (MB/s)", "value": spread(e2e, "{:.1f}")},
            {"figure": "interp socket transfer (MB/s)", "value": socket_rate if socket_rate != "-" else transfer},
        ]
    finally:
        pool.close()
        worker.close()
    return rows


def _utc(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


@contextlib.contextmanager
def gateway(enabled: bool) -> Iterator[tuple[str, str] | None]:
    """Start ``airlock serve`` over an interp grant on SQLite (it loads while this process loads its model)."""
    if not enabled:
        yield None
        return
    with tempfile.TemporaryDirectory() as tmp, database("sqlite", Path(tmp)) as db_url:
        lab = prepare_local_lab(Path(tmp) / "home", db_url)
        with serve(lab) as (url, _pid):
            yield url, lab.key


def gateway_part(opts: argparse.Namespace, url: str, key: str) -> list[dict[str, Any]]:
    """Part 4: the job path through ``airlock serve`` on SQLite."""
    import httpx

    http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120)

    def one() -> dict[str, Any]:
        sent = time.perf_counter()
        job = http.post("/v1/airlock/interp/jobs", json={"model": LOCAL_MODEL, "code": EMPTY})
        if job.status_code != 200:
            raise RuntimeError(f"submit failed: {job.status_code} {job.text}")
        job_id = job.json()["id"]
        while True:
            body = http.get(f"/v1/airlock/interp/jobs/{job_id}").json()
            if body["status"] not in ("queued", "running"):
                break
            time.sleep(0.005)
        if body["status"] != "succeeded":
            raise RuntimeError(f"job {job_id} ended {body['status']}: {body.get('error')} {body.get('logs')}")
        body["client_s"] = time.perf_counter() - sent
        return body

    one()  # warm-up: the model worker, the runner runtime and the pool's first runners
    pickup, ready, total = [], [], []
    for _ in range(opts.gateway_jobs):
        time.sleep(0.5)  # let the pool's replacement runner come up, as between real jobs
        body = one()
        pickup.append((_utc(body["started_at"]) - _utc(body["created_at"])) * MS)
        ready.append(float(body["usage"]["runner_ready_ms"]))
        total.append(body["client_s"] * MS)
    http.close()
    print(
        f"\n4. job path through airlock serve (SQLite, tiny random model), {opts.gateway_jobs} jobs (load {loadavg()})"
    )
    print(f"   submit -> running (pickup)       {spread(pickup, '{:.1f}')} ms   p99 {percentile(pickup, 0.99):.1f}")
    print(f"   pickup -> sandbox ready          {spread(ready, '{:.1f}')} ms   p99 {percentile(ready, 0.99):.1f}")
    print(f"   submit -> result seen by client  {spread(total, '{:.0f}')} ms   (polling every 5 ms)")
    return [
        {"figure": "interp job submit->running (ms)", "value": spread(pickup, "{:.1f}"), "goal": "<= 20"},
        {"figure": "interp job pickup->sandbox ready (ms)", "value": spread(ready, "{:.1f}"), "goal": "<= 150"},
        {"figure": "interp job submit->result (ms)", "value": spread(total, "{:.0f}")},
    ]


def main() -> None:
    """Run the benchmark, print its figures and report them to the ``make bench`` table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and the tiny random model (< 2 min)")
    parser.add_argument("--model", default=None, help="default embedded:smollm2-135m (tiny-random with --quick)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of in-process vs sandboxed (default 5)")
    parser.add_argument("--calls", type=int, default=None, help="trace calls per block (default 20)")
    parser.add_argument("--jobs", type=int, default=None, help="rounds of fresh vs warm runners (default 5)")
    parser.add_argument("--gateway-jobs", type=int, default=None, help="jobs through the gateway (default 10)")
    parser.add_argument("--no-gateway", action="store_true", help="skip the job path through airlock serve")
    opts = parser.parse_args()
    quick = opts.quick
    opts.model = opts.model or ("tiny-random" if quick else "embedded:smollm2-135m")
    opts.rounds = opts.rounds or (3 if quick else 5)
    opts.calls = opts.calls or (5 if quick else 20)
    opts.jobs = opts.jobs or (3 if quick else 5)
    opts.gateway_jobs = opts.gateway_jobs or (5 if quick else 10)
    os.environ.setdefault("AIRLOCK_HOME", tempfile.mkdtemp(prefix="airlock-bench-"))
    started = time.perf_counter()
    with gateway(not opts.no_gateway) as served:
        rows = local_part(opts)
        if served is not None:
            rows += gateway_part(opts, *served)
    print(f"\n(bench_interp took {time.perf_counter() - started:.0f} s)")
    print(json.dumps({r["figure"]: r["value"] for r in rows}))
    report(
        "interp",
        [{**r, "figure": f"{r['figure']} [{opts.model}]" if "trace" in r["figure"] else r["figure"]} for r in rows],
    )


if __name__ == "__main__":
    main()
