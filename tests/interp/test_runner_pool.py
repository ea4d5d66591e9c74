"""Warm runners: each serves exactly one job in its own sandbox, its wall clock starts at hand-over, idle ones die."""

from __future__ import annotations

import asyncio
import time

import pytest

from airlock.interp.pool import RunnerPool
from airlock.interp.run import JobSpec, run_job, runner_limits
from airlock.interp.workers import ThreadWorker
from tests.conftest import needs_bwrap

pytestmark = needs_bwrap

MARK = """
import os
def main(token):
    seen = sorted(os.listdir("/tmp"))
    with open("/tmp/left-by-" + token, "w") as handle:
        handle.write(token)
    return {"seen": seen, "pid": os.getpid(), "processes": sorted(os.listdir("/proc"))}
"""


def _wait(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the pool did not get there in time"
        time.sleep(0.02)


def _run(worker: ThreadWorker, pool: RunnerPool, code: str, limits, **args):
    spec = JobSpec(code=code, filename="job.py", entry_point="main", args=args)
    return asyncio.run(run_job(spec, worker, limits, pool=pool))


def test_each_warm_runner_serves_one_job_in_its_own_sandbox(tiny_worker: ThreadWorker) -> None:
    limits = runner_limits(cpu_seconds=10, wall_seconds=20, memory_bytes=1024 * 2**20, log_bytes=64 * 1024)
    pool = RunnerPool(1, idle_s=120)
    try:
        pool.prime(limits)
        _wait(lambda: pool.warm(limits) == 1)
        first = _run(tiny_worker, pool, MARK, limits, token="first")
        assert first.error is None, first.logs
        assert first.usage["runner_ready_ms"] is not None
        # The first job's end started a replacement; the next job gets that one, not the first's.
        _wait(lambda: pool.warm(limits) == 1)
        second = _run(tiny_worker, pool, MARK, limits, token="second")
        assert second.error is None, second.logs
        assert "left-by-first" not in second.value["seen"]  # a fresh /tmp: nothing of the first job
        assert first.value["seen"] == [] and second.value["seen"] == []
        assert pool.started == 3  # primed one, and one replacement per job taken
    finally:
        pool.close()
    assert pool.warm(limits) == 0


def test_the_wall_clock_starts_when_the_job_is_handed_over(tiny_worker: ThreadWorker) -> None:
    limits = runner_limits(cpu_seconds=10, wall_seconds=2, memory_bytes=1024 * 2**20, log_bytes=64 * 1024)
    pool = RunnerPool(1, idle_s=120)
    try:
        pool.prime(limits)
        _wait(lambda: pool.warm(limits) == 1)
        time.sleep(2.2)  # longer than the job's whole wall-clock limit, spent waiting in the pool
        outcome = _run(
            tiny_worker, pool, "import time\ndef main():\n    time.sleep(0.3)\n    return {'ok': 1}\n", limits
        )
        assert outcome.error is None, (outcome.error, outcome.logs)
        assert outcome.usage["wall_seconds"] < 2
        # A job that overruns still meets its limit, counted from hand-over.
        slow = _run(tiny_worker, pool, "import time\ndef main():\n    time.sleep(60)\n", limits)
        assert slow.error is not None and slow.error.code == "timeout"
    finally:
        pool.close()


def test_an_idle_runner_is_killed_and_not_replaced() -> None:
    limits = runner_limits(cpu_seconds=10, wall_seconds=20, memory_bytes=1024 * 2**20, log_bytes=64 * 1024)
    pool = RunnerPool(2, idle_s=1.0)
    try:
        pool.prime(limits)
        assert pool.warm(limits) == 2
        _wait(lambda: pool.warm(limits) == 0)
        assert pool.started == 2
    finally:
        pool.close()


def test_a_closed_pool_hands_out_nothing() -> None:
    pool = RunnerPool(1)
    pool.close()
    with pytest.raises(RuntimeError):
        pool.acquire(runner_limits(cpu_seconds=1, wall_seconds=1, memory_bytes=2**28, log_bytes=1024))


def test_a_served_gateway_starts_warm_runners_for_the_default_limits_before_any_job() -> None:
    from airlock.app import prime_warm_runners
    from airlock.config import Settings
    from airlock.interp.jobs import KIND, InterpHandler

    settings = Settings(interp_cpu_seconds=7, interp_wall_timeout_s=30.0, interp_memory_mb=512)
    pool = RunnerPool(1, idle_s=120)
    handler = InterpHandler(None, settings, lambda spec: None, pool)  # type: ignore[arg-type]
    try:
        limits = handler.default_limits()
        # On the Ray plane interp runs in model workers: the gateway starts no runner of its own.
        prime_warm_runners({KIND: handler}, executor=object())  # type: ignore[arg-type]
        assert pool.started == 0
        prime_warm_runners({KIND: handler}, executor=None)
        _wait(lambda: pool.warm(limits) == 1)
        # A job with the default limits takes the primed runner instead of starting one.
        runner = pool.acquire(limits)
        try:
            assert pool.started == 1
        finally:
            runner.kill()
            runner.outcome.result(timeout=30)
            runner.close()
    finally:
        pool.close()


def test_a_handler_without_a_pool_primes_nothing() -> None:
    from airlock.config import Settings
    from airlock.interp.jobs import InterpHandler

    assert InterpHandler(None, Settings(), lambda spec: None, None).prime() is None  # type: ignore[arg-type]
