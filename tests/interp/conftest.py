"""Fixtures of the interp tests: one tiny random model on its own thread, and a helper to run code."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from airlock.interp.pool import RunnerPool
from airlock.interp.run import JobSpec, RunOutcome, run_job, runner_limits
from airlock.interp.workers import ModelWorker, ThreadWorker


@pytest.fixture(scope="session")
def tiny_worker() -> Iterator[ThreadWorker]:
    """The tiny-random model (2 layers, hidden 64) owned by one thread, shared by the session."""
    from airlock.backends import weights

    loaded = weights.load_model("tiny-random")
    worker = ThreadWorker(loaded.model, loaded.tokenizer)
    yield worker
    worker.close()


@pytest.fixture(scope="session")
def smollm2_worker() -> Iterator[ThreadWorker]:
    """SmolLM2-135M-Instruct (30 layers, hidden 576, tied 49,152 x 576 embedding) on its own thread."""
    from airlock.backends import weights

    loaded = weights.load_model("embedded:smollm2-135m")
    worker = ThreadWorker(loaded.model, loaded.tokenizer)
    yield worker
    worker.close()


RunCode = Callable[..., RunOutcome]


@pytest.fixture
def run_code(tiny_worker: ThreadWorker) -> RunCode:
    """Return ``run(code, **limits)``: run the code's ``main`` in a fresh sandboxed runner on the tiny model."""
    return functools.partial(_run_code, tiny_worker)


def _run_code(
    worker: ModelWorker,
    code: str,
    *,
    args: dict[str, Any] | None = None,
    cpu_seconds: int = 10,
    wall_seconds: float = 20.0,
    memory_mb: int = 1024,
    log_bytes: int = 64 * 1024,
    max_result_bytes: int = 1024 * 1024,
    pool: RunnerPool | None = None,
) -> RunOutcome:
    """Run ``code``'s ``main`` in a fresh sandboxed runner (a warm one from ``pool``) against ``worker``."""
    spec = JobSpec(code=code, filename="job.py", entry_point="main", args=args or {})
    limits = runner_limits(
        cpu_seconds=cpu_seconds, wall_seconds=wall_seconds, memory_bytes=memory_mb * 1024 * 1024, log_bytes=log_bytes
    )
    return asyncio.run(run_job(spec, worker, limits, max_result_bytes=max_result_bytes, pool=pool))


@pytest.fixture(scope="module")
def runner_pool() -> Iterator[RunnerPool]:
    """A pool of warm runners (one per set of limits), closed with the module."""
    pool = RunnerPool(1, idle_s=120.0)
    yield pool
    pool.close()


@pytest.fixture
def run_pooled(tiny_worker: ThreadWorker, runner_pool: RunnerPool) -> RunCode:
    """Like ``run_code``, but each job takes a warm runner from ``runner_pool`` (as the gateway's jobs do)."""
    return functools.partial(_run_code, tiny_worker, pool=runner_pool)
