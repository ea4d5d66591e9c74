"""The policy's data: results read as their termination says, and malformed policies are refused."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from airlock.sandbox import Mount, ResourceLimits, SandboxPolicy, SandboxResult, Termination
from tests.conftest import needs_bwrap


@needs_bwrap
def test_result_helpers() -> None:
    result = SandboxResult(
        exit_code=0,
        stdout=b"\xffok",
        stderr=b"",
        stdout_truncated=False,
        stderr_truncated=False,
        wall_time_s=0.1,
        cpu_time_s=0.0,
        max_rss_kib=1,
        termination=Termination.EXITED,
    )
    assert result.ok and result.stdout_text == "\ufffdok" and result.signal is None


def _result(exit_code: int, termination: Termination, **fields: Any) -> SandboxResult:
    base: dict[str, Any] = {
        "stdout": b"",
        "stderr": b"",
        "stdout_truncated": False,
        "stderr_truncated": False,
        "wall_time_s": 1.0,
        "cpu_time_s": 0.5,
        "max_rss_kib": 1,
    }
    return SandboxResult(exit_code=exit_code, termination=termination, **{**base, **fields})


def test_a_result_reads_as_its_termination_says() -> None:
    segfault = _result(128 + signal.SIGSEGV, Termination.SIGNALED)
    assert segfault.signal == signal.SIGSEGV and not segfault.ok
    killed_at_timeout = _result(137, Termination.TIMEOUT)  # Airlock's own kill is not the command's signal
    assert killed_at_timeout.timed_out and killed_at_timeout.signal is None
    failed = _result(3, Termination.EXITED, stderr_truncated=True)
    assert not failed.ok and failed.signal is None and failed.truncated


def test_malformed_policies_are_refused() -> None:
    with pytest.raises(ValidationError, match="extra"):
        ResourceLimits(cpu_second=5)  # type: ignore[call-arg]  # a misspelt limit is not silently ignored
    with pytest.raises(ValidationError, match="greater than 0"):
        ResourceLimits(cpu_seconds=0)
    with pytest.raises(ValidationError, match=r"without '\.\.'"):
        Mount(source=Path("/usr"), target="/data/../etc")
    with pytest.raises(ValidationError, match="frozen"):
        SandboxPolicy().hostname = "host"  # type: ignore[misc]  # shared by every run: never changed under one
