"""Shared helpers of the benchmarks: statistics, the machine's load, process CPU and one result table."""

from __future__ import annotations

import json
import os
import socket
import statistics
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

# Prompts of the generation benchmarks: "Write a long, detailed paragraph about {topic}."
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

RESULTS_ENV = "AIRLOCK_BENCH_RESULTS"
"""When set, every figure a benchmark prints is also appended to this JSON-lines file (``make bench``)."""


def loadavg() -> str:
    """Return the 1-minute load average and the core count, e.g. ``1.93/2``."""
    return f"{os.getloadavg()[0]:.2f}/{os.cpu_count()}"


def spread(values: Sequence[float], fmt: str = "{:.3g}") -> str:
    """Return ``min/median/max`` of repeated measurements."""
    if not values:
        return "-"
    return "/".join(fmt.format(v) for v in (min(values), statistics.median(values), max(values)))


def percentile(values: Sequence[float], q: float) -> float:
    """Return the ``q`` quantile (nearest rank) of ``values``."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def free_port() -> int:
    """Return a free loopback TCP port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 120.0) -> None:
    """Wait until ``url`` answers 200 (a server starting in another process)."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer within {timeout:.0f}s")
        time.sleep(0.1)


def tree_cpu_seconds(pid: int) -> float:
    """Return user+system CPU seconds of process ``pid`` and all its live descendants."""
    import psutil

    total = 0.0
    try:
        root = psutil.Process(pid)
        for proc in [root, *root.children(recursive=True)]:
            try:
                t = proc.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                continue
    except psutil.NoSuchProcess:
        pass
    return total


def report(bench: str, rows: Iterable[dict[str, Any]]) -> None:
    """Append figures to the ``make bench`` results file when one is set (each row: figure, value, goal...)."""
    path = os.environ.get(RESULTS_ENV)
    if not path:
        return
    with Path(path).open("a") as out:
        for row in rows:
            out.write(json.dumps({"bench": bench, "load": loadavg(), **row}) + "\n")
