"""CPU over the whole sandbox: every process together, exited and killed ones included, by cgroup v2 or /proc."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from airlock.sandbox import BwrapSandbox, ResourceLimits, SandboxError, SandboxPolicy, Termination, cgroup_parent
from airlock.sandbox.accounting import Cgroup, CpuWatch
from tests.conftest import needs_bwrap
from tests.sandbox.conftest import py, sandbox


@needs_bwrap
async def test_cpu_time_limit() -> None:
    result = await sandbox(cpu_seconds=1, wall_timeout_s=20).run(py("while True: pass"))
    assert result.termination is Termination.CPU_LIMIT, result
    assert 0.8 < result.cpu_time_s < 4 and result.wall_time_s < 6


@needs_bwrap
async def test_cpu_time_counts_every_process_even_when_killed() -> None:
    # Each spinner reports the CPU it has used, so the assertions rest on its progress, not on how
    # much of the machine it got in a second of wall time.
    # An orphan that spins on after the command has waited for its first 0.4 s of CPU, killed when
    # the command ends...
    orphan_code = "import time\nwhile time.process_time() < 0.4: pass\nopen('spun', 'w').close()\nwhile True: pass"
    orphan = await sandbox(wall_timeout_s=600).run(
        ["bash", "-c", f'cd /tmp && (python3 -c "{orphan_code}" &); until [ -e spun ]; do sleep 0.05; done']
    )
    assert orphan.ok and orphan.cpu_time_s >= 0.4, orphan
    # ...and a spinning command killed by the wall-clock timeout: both still accounted.
    spinner = await sandbox().run(
        py(
            """
            import sys, time
            mark = 0.0
            while True:
                if time.process_time() - mark >= 0.05:
                    mark = time.process_time()
                    print(mark, flush=True)
            """
        ),
        timeout=1,
    )
    reported = [float(line) for line in spinner.stdout_text.split()]
    assert spinner.timed_out and reported and spinner.cpu_time_s >= reported[-1], spinner


_ACCOUNTINGS = [
    pytest.param(
        "cgroup", marks=pytest.mark.skipif(cgroup_parent() is None, reason="no writable cgroup v2 on this machine")
    ),
    "proc",
]


_SPINNERS = """
    import os
    for _ in range(6):
        if os.fork() == 0:
            while True:
                pass
    os.wait()
"""


@needs_bwrap
@pytest.mark.parametrize("accounting", _ACCOUNTINGS)
async def test_cpu_limit_covers_the_whole_process_tree(accounting: str) -> None:
    # Six spinners each stay far below a per-process limit; together they reach the sandbox's.
    policy = SandboxPolicy(limits=ResourceLimits(cpu_seconds=2, wall_timeout_s=60), cpu_accounting=accounting)  # type: ignore[arg-type]
    result = await BwrapSandbox(policy).run(py(_SPINNERS))
    assert result.termination is Termination.CPU_LIMIT and result.cpu_accounting == accounting, result
    # Killed at the tree's limit, where six per-process limits would let them burn 6 x 2 s. /proc
    # counts whole ticks per process, so it errs early by a few; above the limit is what the
    # spinners burn while the watcher waits for a CPU on a loaded host (a second of two cores
    # in CI once), so the bound is twice the limit, still far from six times it.
    assert 1.9 <= result.cpu_time_s < 2 * 2
    assert result.exit_code == 137 and result.wall_time_s < 30
    parent = cgroup_parent()
    if parent is not None:  # the run's own cgroup is gone with it
        assert not list(parent.glob(f"airlock-sbx-{os.getpid()}-*"))


@needs_bwrap
@pytest.mark.parametrize("accounting", _ACCOUNTINGS)
async def test_cpu_of_children_that_already_exited_counts(accounting: str) -> None:
    # Each child spins 0.3 s and exits, reaped by a parent that uses no CPU: no process ever
    # nears the limit, the tree passes it after a few children.
    serial = """
        import os, time
        for n in range(40):
            if os.fork() == 0:
                start = time.process_time()
                while time.process_time() - start < 0.3:
                    pass
                os._exit(0)
            os.wait()
            print(n, flush=True)
    """
    policy = SandboxPolicy(limits=ResourceLimits(cpu_seconds=1, wall_timeout_s=60), cpu_accounting=accounting)  # type: ignore[arg-type]
    result = await BwrapSandbox(policy).run(py(serial))
    assert result.termination is Termination.CPU_LIMIT, result
    # Uncounted exits would let all 40 run (12 s); the slack is the watcher's latency on a loaded host.
    assert len(result.stdout_text.split()) <= 6 and 0.9 <= result.cpu_time_s < 2 * 1


@needs_bwrap
async def test_cgroup_accounting_is_refused_where_no_cgroup_can_be_made(tmp_path: Path) -> None:
    policy = SandboxPolicy(cpu_accounting="cgroup", cgroup_parent=tmp_path)
    with pytest.raises(SandboxError, match="no writable cgroup v2"):
        await BwrapSandbox(policy).run(["true"])
    assert (await BwrapSandbox(SandboxPolicy(cgroup_parent=tmp_path)).run(["true"])).cpu_accounting == "proc"


@needs_bwrap
def test_cgroup_counters_are_read(tmp_path: Path) -> None:
    group = Cgroup(tmp_path)
    (tmp_path / "cpu.stat").write_text("usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\n")
    assert group.cpu_seconds() == 2.5 and group.oom_kills() == 0  # no memory controller: no events file
    (tmp_path / "memory.events").write_text("low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\n")
    assert group.oom_kills() == 1


def test_cpu_watch_kills_once_the_count_and_its_lag_reach_the_limit() -> None:
    # (CPU counted, how far it may lag): the kill comes at the first sample whose sum reaches the
    # limit, never later; a failing read (the sandbox ending) is skipped, not fatal.
    samples: list[tuple[float, float] | OSError] = [(0.2, 0.1), OSError("gone"), (0.5, 0.1), (0.85, 0.1), (0.95, 0.1)]
    taken: list[tuple[float, float]] = []
    kills: list[float] = []
    woken = threading.Event()

    def meter() -> tuple[float, float]:
        sample = samples.pop(0)
        if isinstance(sample, OSError):
            raise sample
        taken.append(sample)
        return sample

    watch = CpuWatch(meter, 1.0, 0.01, kill=lambda: kills.append(watch.used), wake=woken.set)
    watch.start()
    assert woken.wait(10)
    watch.stop()
    assert watch.exceeded and kills == [0.95] and taken == [(0.2, 0.1), (0.5, 0.1), (0.85, 0.1), (0.95, 0.1)]
    assert samples == []


def test_a_waiting_warm_run_is_sampled_seldom_until_its_work_starts() -> None:
    samples = 0
    sampled = threading.Event()

    def meter() -> tuple[float, float]:
        nonlocal samples
        samples += 1
        sampled.set()
        return (0.0, 0.0)

    watch = CpuWatch(meter, 100.0, 0.001, kill=lambda: None, wake=lambda: None, waiting_interval=3600)
    watch.start()
    threading.Event().wait(0.2)  # a thousand samples' worth at the working pace
    assert samples == 0
    watch.work_started()
    assert sampled.wait(10)
    while samples < 5:  # now at the working pace
        threading.Event().wait(0.01)
    watch.stop()


def test_a_waiting_warm_run_still_cannot_pass_its_limit() -> None:
    # The sandbox burns every core from the start: the wait before each sample never exceeds the
    # CPU left over the cores, so the kill comes at the limit, not after the hour-long waiting pace.
    start = time.monotonic()
    woken = threading.Event()
    watch = CpuWatch(
        lambda: ((time.monotonic() - start) * (os.cpu_count() or 1), 0.0),
        0.2 * (os.cpu_count() or 1),
        0.01,
        kill=lambda: None,
        wake=woken.set,
        waiting_interval=3600,
    )
    watch.start()
    assert woken.wait(30)
    watch.stop()
    assert watch.exceeded and watch.used >= 0.2 * (os.cpu_count() or 1)


@needs_bwrap
async def test_peak_memory_is_the_sandboxes_own_not_the_forked_hosts() -> None:
    # The host holds far more than the sandboxed program will; the program holds 64 MiB until told
    # (by its own progress) that a few samples have passed.
    ballast = b"\x01" * (512 * 1024 * 1024)
    result = await sandbox(cpu_seconds=60, wall_timeout_s=600).run(
        py(
            """
            import time
            held = b"\\x01" * (64 * 1024 * 1024)
            start = time.monotonic()
            while time.monotonic() - start < 0.6:
                time.sleep(0.05)
            """
        )
    )
    del ballast
    assert result.ok, result
    assert 60 * 1024 <= result.max_rss_kib < 400 * 1024, result.max_rss_kib


def test_a_reaped_peak_no_higher_than_the_fork_is_not_the_sandboxes() -> None:
    from airlock.sandbox.process import _sandbox_peak_rss

    assert _sandbox_peak_rss(2_000_000, 2_000_000, 70_000) == 70_000  # the fork's own high-water mark
    assert _sandbox_peak_rss(2_500_000, 2_000_000, 70_000) == 2_500_000  # beyond the fork: the sandbox's
    assert _sandbox_peak_rss(1_000, 2_000_000, 0) == 0  # no sample, nothing trustworthy: unknown
