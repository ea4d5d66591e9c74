"""One sandboxed run: a delivered result with its usage, a cancelled run, and the CPU limit a grant's quota leaves."""

from __future__ import annotations

import asyncio
import textwrap
from collections.abc import Callable

from airlock.interp.run import JobSpec, RunOutcome, cpu_limit_for, run_job, runner_limits
from airlock.interp.workers import ThreadWorker
from tests.conftest import needs_bwrap


def test_the_cpu_limit_is_the_default_or_what_the_grant_has_left() -> None:
    assert cpu_limit_for(None, 30) == 30
    assert cpu_limit_for(100.0, 30) == 30
    assert cpu_limit_for(12.7, 30) == 12
    assert cpu_limit_for(0.2, 30) == 1  # a sliver of quota still starts the runner; the quota check is earlier


@needs_bwrap
def test_a_run_delivers_its_value_and_usage(run_code: Callable[..., RunOutcome]) -> None:
    code = """
        from airlock.interp import client
        def main(word):
            print("working")
            return {"layers": client.model_info()["n_layers"], "word": word}
        """
    outcome = run_code(textwrap.dedent(code), args={"word": "hi"})
    assert outcome.error is None, outcome.error
    assert outcome.value == {"layers": 2, "word": "hi"} and "working" in outcome.logs
    usage = outcome.usage
    assert usage["termination"] == "exited" and usage["exit_code"] == 0 and usage["cpu_seconds"] > 0
    assert usage["rpc"]["calls"] == {"job": 1, "modules": 1, "result": 1}


@needs_bwrap
def test_a_cancelled_run_ends_without_a_value_or_an_error(tiny_worker: ThreadWorker) -> None:
    code = "import time\ndef main():\n    time.sleep(60)\n"
    spec = JobSpec(code=code, filename="job.py", entry_point="main", args={})
    limits = runner_limits(cpu_seconds=10, wall_seconds=60, memory_bytes=1 << 30, log_bytes=1 << 16)
    outcome = asyncio.run(run_job(spec, tiny_worker, limits, cancelled=lambda: True))
    assert outcome.value is None and outcome.error is None and outcome.logs == ""
    assert set(outcome.usage) == {"rpc"}
