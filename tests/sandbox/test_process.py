"""Running one sandboxed command: the wall clock, cancellation, the output cap, signal deaths, setup failures."""

from __future__ import annotations

import asyncio
import secrets
import time
from pathlib import Path

import pytest

from airlock.sandbox import BwrapSandbox, Mount, SandboxError, SandboxPolicy, Termination
from tests.conftest import needs_bwrap
from tests.sandbox.conftest import sandbox

pytestmark = needs_bwrap


def _host_processes_matching(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _wait_gone(marker: str, seconds: float = 2.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while (left := _host_processes_matching(marker)) and time.monotonic() < deadline:
        time.sleep(0.02)
    return left


async def test_wall_clock_timeout_kills_the_whole_sandbox() -> None:
    marker = f"{secrets.randbelow(10**6) + 10**6}"
    started = time.monotonic()
    result = await sandbox().run(["bash", "-c", f"sleep 3{marker} & sleep 4{marker}; echo never"], timeout=0.5)
    assert result.termination is Termination.TIMEOUT and result.timed_out and not result.ok
    assert result.exit_code == 137 and "never" not in result.stdout_text
    assert time.monotonic() - started < 3
    assert _wait_gone(marker) == []  # the background sleep died with the sandbox too


async def test_cancelling_a_run_kills_the_sandbox() -> None:
    marker = f"{secrets.randbelow(10**6) + 10**6}"
    run = asyncio.ensure_future(sandbox().run(["sleep", f"5{marker}"], timeout=60))
    await asyncio.sleep(0.3)
    assert _host_processes_matching(marker)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert _wait_gone(marker) == []


async def test_output_is_capped() -> None:
    result = await sandbox(output_bytes=64 * 1024).run(["bash", "-c", "echo small >&2; yes"])
    assert result.termination is Termination.OUTPUT_LIMIT
    assert len(result.stdout) == 64 * 1024 and result.stdout_truncated and result.truncated
    assert result.stderr == b"small\n" and not result.stderr_truncated
    assert result.wall_time_s < 3  # killed at the cap, not at the timeout


async def test_signal_deaths_are_reported() -> None:
    result = await sandbox().run(["bash", "-c", "kill -SEGV $$"])
    assert result.termination is Termination.SIGNALED and result.signal == 11


async def test_setup_failure_is_a_sandbox_error() -> None:
    policy = SandboxPolicy(mounts=(Mount(source=Path("/nonexistent-airlock-path"), target="/data"),))
    with pytest.raises(SandboxError, match="set up the sandbox"):
        await BwrapSandbox(policy).run(["true"])
