"""Warm sandboxed runners: a few started ahead of their jobs, each handed to exactly one job, then destroyed.

Starting a runner (bubblewrap's namespaces and mounts, the interpreter, numpy) takes a few
hundred milliseconds; a job that finds a warm runner waiting only hands it its code. Isolation
is that of a fresh runner, because it *is* a fresh runner: each is a new sandbox with its own
namespaces, started before any job is known, shown nothing until its one job is handed over
(its code, over its own socket), and gone when that job ends. No runner ever serves a second job.

* runners are kept per set of :class:`~airlock.sandbox.ResourceLimits` (the limits are fixed
  when the sandbox starts): when a job that took one ends, the pool refills that set in the
  background;
* a runner's wall-clock limit starts when its job is handed over; a runner left unused for
  ``idle_s`` seconds is killed, and not replaced until a job with its limits comes again;
* every runner is spawned from the pool's own long-lived thread, so bubblewrap's
  ``--die-with-parent`` (bound to the spawning thread) does not end it with a job's thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import select
import socket
import threading
import time
from collections.abc import Callable

from airlock.interp import _runtime
from airlock.interp.runner import FD_ENV
from airlock.sandbox import DENY_SYSCALLS, BwrapSandbox, Mount, ResourceLimits, SandboxPolicy, SandboxResult

__all__ = ["RUNNER_ENV", "RunnerPool", "SandboxedRunner", "close_shared_pools", "shared_pool", "start_runner"]

log = logging.getLogger(__name__)

RUNNER_ENV = {
    # One thread per numerical library: the CPU limit counts every thread of every process,
    # so a pool only spends it faster, and idle pools would eat the memory limit.
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


class SandboxedRunner:
    """One started runner: its socket to the host, its run's outcome, and the switch that starts its clock."""

    def __init__(
        self, limits: ResourceLimits, loop: asyncio.AbstractEventLoop, sandbox: BwrapSandbox, idle_s: float | None
    ) -> None:
        runtime = _runtime.ensure_runtime()
        self.limits = limits
        self.started_at = time.monotonic()
        self.host_end, self.runner_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._loop = loop
        self._clock = asyncio.Event()
        self._kill = asyncio.Event()
        env = {FD_ENV: str(self.runner_end.fileno()), **RUNNER_ENV}
        self.outcome: concurrent.futures.Future[SandboxResult | None] = asyncio.run_coroutine_threadsafe(
            self._supervise(sandbox, runtime.argv, env, idle_s), loop
        )

    async def _supervise(
        self, sandbox: BwrapSandbox, argv: list[str], env: dict[str, str], idle_s: float | None
    ) -> SandboxResult | None:
        # A warm runner's wall clock waits for its job (at most idle_s); a fresh one's runs from its start.
        run = asyncio.ensure_future(
            sandbox.run(
                argv,
                env=env,
                pass_fds=[self.runner_end.fileno()],
                timeout=self.limits.wall_timeout_s,
                start_clock=self._clock if idle_s is not None else None,
                idle_timeout=idle_s or 0.0,
            )
        )
        kill = asyncio.ensure_future(self._kill.wait())
        await asyncio.wait({run, kill}, return_when=asyncio.FIRST_COMPLETED)
        kill.cancel()
        if not run.done():
            run.cancel()  # the run kills and reaps the whole sandbox before it returns
            with contextlib.suppress(asyncio.CancelledError):
                await run
            return None
        return run.result()

    def ready(self, timeout: float = 0.0) -> bool:
        """Whether the runner is up and has asked for its job (waiting up to ``timeout`` seconds)."""
        try:
            readable, _, _ = select.select([self.host_end], [], [], timeout)
        except (OSError, ValueError):
            return False
        return bool(readable)

    def start_clock(self) -> None:
        """Start the run's wall-clock limit: its job is being handed over now."""
        self._loop.call_soon_threadsafe(self._clock.set)

    def kill(self) -> None:
        """End the run (its whole sandbox); :attr:`outcome` then resolves to None."""
        with contextlib.suppress(RuntimeError):  # the pool's loop is closed: the run is gone already
            self._loop.call_soon_threadsafe(self._kill.set)

    def close(self) -> None:
        """Close the host's ends of the runner's socket (once its run is over)."""
        self.runner_end.close()
        with contextlib.suppress(OSError):
            self.host_end.shutdown(socket.SHUT_RDWR)
        self.host_end.close()


def _policy(limits: ResourceLimits) -> SandboxPolicy:
    runtime = _runtime.ensure_runtime()
    return SandboxPolicy(
        limits=limits,
        mounts=tuple(Mount(source=src, target=dst) for src, dst in runtime.mounts),
        hostname="airlock-interp",
        deny_syscalls=DENY_SYSCALLS,
    )


class _Loop:
    """An event loop on a daemon thread that lives as long as the process (or the pool)."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        if not self.thread.is_alive():
            self.loop.close()


_fresh_loop: _Loop | None = None
_fresh_lock = threading.Lock()


def start_runner(limits: ResourceLimits) -> SandboxedRunner:
    """Start one fresh runner now, outside any pool (a cold start)."""
    global _fresh_loop
    with _fresh_lock:
        if _fresh_loop is None:
            _fresh_loop = _Loop("airlock-interp-runners")
        loop = _fresh_loop.loop
    return SandboxedRunner(limits, loop, BwrapSandbox(_policy(limits)), None)


class RunnerPool:
    """Keeps up to ``size`` warm runners per set of limits in use; each is taken by one job only."""

    def __init__(self, size: int = 2, *, idle_s: float = 600.0) -> None:
        if size < 1:
            raise ValueError("a runner pool holds at least one runner")
        self.size = size
        self.idle_s = idle_s
        self._loop = _Loop("airlock-interp-pool")
        self._lock = threading.Lock()
        self._warm: dict[ResourceLimits, list[SandboxedRunner]] = {}
        self._sandboxes: dict[ResourceLimits, BwrapSandbox] = {}
        self._closed = False
        self.started = 0
        """Runners this pool has started (warm or not), for tests and benchmarks."""

    def warm(self, limits: ResourceLimits) -> int:
        """Return how many runners with ``limits`` are waiting (started, not taken)."""
        with self._lock:
            return len(self._warm.get(limits, []))

    def prime(self, limits: ResourceLimits) -> None:
        """Start runners for ``limits`` until ``size`` wait (without taking one)."""
        self._refill(limits)

    def acquire(self, limits: ResourceLimits) -> SandboxedRunner:
        """Take a runner for one job: a warm one (ready ones first) or, when none waits, a fresh one."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the runner pool is closed")
            waiting = [r for r in self._warm.get(limits, []) if not r.outcome.done()]
            waiting.sort(key=lambda r: (not r.ready(), r.started_at))
            runner = waiting.pop(0) if waiting else None
            self._warm[limits] = waiting
        return runner if runner is not None else self._start(limits)

    def release(self, limits: ResourceLimits) -> None:
        """Start the replacement of a runner with ``limits`` whose job has ended.

        Replacements start after a job rather than beside it, so on a small machine a starting
        runner does not compete with the job for the CPU; the other waiting runners cover jobs
        that arrive meanwhile.
        """
        self._refill(limits)

    def _start(self, limits: ResourceLimits) -> SandboxedRunner:
        with self._lock:
            sandbox = self._sandboxes.get(limits)
            if sandbox is None:
                sandbox = self._sandboxes[limits] = BwrapSandbox(_policy(limits))
            self.started += 1
        return SandboxedRunner(limits, self._loop.loop, sandbox, self.idle_s)

    def _refill(self, limits: ResourceLimits) -> None:
        while True:
            with self._lock:
                if self._closed or len(self._warm.get(limits, [])) >= self.size:
                    return
            runner = self._start(limits)
            with self._lock:
                self._warm.setdefault(limits, []).append(runner)
            runner.outcome.add_done_callback(self._expired(limits, runner))

    def _expired(self, limits: ResourceLimits, runner: SandboxedRunner) -> Callable[[object], None]:
        def forget(_future: object) -> None:
            # An untaken runner whose run ended (idle past its limit, killed, failed to start).
            with self._lock:
                waiting = self._warm.get(limits, [])
                if runner in waiting:
                    waiting.remove(runner)
                else:
                    return
            runner.close()
            with contextlib.suppress(BaseException):
                error = runner.outcome.exception()
                if error is not None:
                    log.warning("interp runner pool: a warm runner failed to start: %s", error)

        return forget

    def close(self) -> None:
        """Kill every waiting runner and stop the pool's thread."""
        with self._lock:
            self._closed = True
            waiting = [r for runners in self._warm.values() for r in runners]
            self._warm.clear()
        for runner in waiting:
            runner.kill()
        for runner in waiting:
            with contextlib.suppress(BaseException):
                runner.outcome.result(timeout=10)
            runner.close()
        self._loop.stop()


_shared: dict[tuple[int, float], RunnerPool] = {}


def shared_pool(size: int, idle_s: float) -> RunnerPool | None:
    """Return this process's pool of ``size`` warm runners per set of limits (None when ``size`` is 0)."""
    if size <= 0:
        return None
    with _fresh_lock:
        pool = _shared.get((size, idle_s))
        if pool is None:
            pool = _shared[(size, idle_s)] = RunnerPool(size, idle_s=idle_s)
        return pool


def close_shared_pools() -> None:
    """Kill the waiting runners of every shared pool of this process (a later ``shared_pool`` starts afresh)."""
    with _fresh_lock:
        pools = list(_shared.values())
        _shared.clear()
    for pool in pools:
        pool.close()
