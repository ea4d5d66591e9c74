"""One run of an interp job: the evaluator's code in a fresh sandboxed runner, the host's RPC, and how it ended.

The host holds the weights; the evaluator's code runs in a fresh bubblewrap runner
(:mod:`airlock.interp.runner`, over the lean Python of :mod:`airlock.interp._runtime`) whose
only channel back is one socket, answered by an :class:`~airlock.interp.rpc.RpcServer`. The
run's raw result comes back in a :class:`RunOutcome` with its usage and, when the runner did not
deliver, a job error naming the cause; the output policy (:mod:`airlock.interp.output_policy`)
is applied after, by the job handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from airlock.interp.errors import InterpJobError
from airlock.interp.pool import RunnerPool, start_runner
from airlock.interp.rpc import RpcServer
from airlock.interp.runner import EXIT_OK, EXIT_PROTOCOL_ERROR, EXIT_USER_ERROR
from airlock.interp.tracing import DEFAULT_PATCH_NORM_RATIO, ServeBudget
from airlock.interp.workers import ModelWorker
from airlock.sandbox import (
    MiB,
    ResourceLimits,
    SandboxResult,
    Termination,
)


@dataclass(frozen=True)
class JobSpec:
    """The evaluator's code and how to call it."""

    code: str
    filename: str
    entry_point: str
    args: dict[str, Any]
    system_prompt: str | None = None
    """The variant's system prompt (its ``system_prompt`` mitigations), applied to chat-formatted prompts."""


@dataclass
class RunOutcome:
    """What happened in one sandboxed run (result still raw: the policy comes after)."""

    value: Any
    logs: str
    usage: dict[str, Any]
    error: InterpJobError | None


def runner_limits(*, cpu_seconds: int, wall_seconds: float, memory_bytes: int, log_bytes: int) -> ResourceLimits:
    """Return the sandbox limits of a runner."""
    return ResourceLimits(
        wall_timeout_s=wall_seconds,
        cpu_seconds=cpu_seconds,
        memory_bytes=memory_bytes,
        max_processes=64,
        file_size_bytes=16 * MiB,
        open_files=256,
        output_bytes=log_bytes,
        tmp_bytes=64 * MiB,
        shm_bytes=16 * MiB,
    )


async def run_job(
    spec: JobSpec,
    worker: ModelWorker,
    limits: ResourceLimits,
    *,
    cancelled: Callable[[], bool] = lambda: False,
    max_result_bytes: int = 64 * MiB,
    max_patch_ratio: float = DEFAULT_PATCH_NORM_RATIO,
    serve: ServeBudget | None = None,
    pool: RunnerPool | None = None,
    since: float | None = None,
) -> RunOutcome:
    """Run ``spec`` in a fresh sandboxed runner that talks to ``worker``; never raises for the code's faults.

    The runner is a warm one from ``pool`` when given (started before the job, never reused),
    else one started now; ``usage["runner_ready_ms"]`` is the time from ``since`` (a
    ``time.monotonic()`` reading, by default the moment the runner is asked for) until it took
    its job. ``serve`` sets the logits the job may see, the per-call caps and the grant's serving
    budget; it counts the payload served (``serve.served``).
    """
    acquired = time.monotonic() if since is None else since
    runner = pool.acquire(limits) if pool is not None else start_runner(limits)
    job = {"ok": True, "code": spec.code, "filename": spec.filename, "entry_point": spec.entry_point, "args": spec.args}
    server = RpcServer(
        runner.host_end,
        worker,
        job,
        max_result_bytes=max_result_bytes,
        max_model_seconds=float(limits.cpu_seconds) if limits.cpu_seconds is not None else None,
        wall_deadline=time.monotonic() + limits.wall_timeout_s,
        system_prompt=spec.system_prompt,
        max_patch_ratio=max_patch_ratio,
        serve=serve,
    )
    # The job's wall clock starts now, for a warm runner as for a fresh one.
    runner.start_clock()
    server.start()
    cancel_kill = False
    result: SandboxResult | None = None
    try:
        outcome = asyncio.wrap_future(runner.outcome)
        while not outcome.done():
            await asyncio.wait({outcome}, timeout=0.2)
            if not outcome.done() and cancelled():
                cancel_kill = True
                runner.kill()
                with contextlib.suppress(asyncio.CancelledError):
                    await outcome
        result = None if cancel_kill else outcome.result()
    finally:
        if not runner.outcome.done():
            runner.kill()  # this coroutine was cancelled: never leave the sandbox behind
        # The runner is gone; unblock the server thread if it still waits on a read.
        runner.runner_end.close()
        with contextlib.suppress(OSError):
            runner.host_end.shutdown(socket.SHUT_RDWR)
        server.join()
        runner.host_end.close()
        if pool is not None:
            pool.release(limits)
    ready_ms = None if server.stats.job_sent_at is None else round((server.stats.job_sent_at - acquired) * 1000, 1)
    if result is None:
        return RunOutcome(value=None, logs="", usage={"rpc": server.stats.as_dict()}, error=None)
    usage = {
        "runner_ready_ms": ready_ms,
        "cpu_seconds": round(result.cpu_time_s, 3),
        "wall_seconds": round(result.wall_time_s, 3),
        "max_rss_kib": result.max_rss_kib,
        "exit_code": result.exit_code,
        "termination": result.termination.value,
        "cpu_accounting": result.cpu_accounting,
        "rpc": server.stats.as_dict(),
    }
    logs = result.stdout_text + (("\n" if result.stdout and result.stderr else "") + result.stderr_text)
    return RunOutcome(
        value=server.result if server.has_result else None,
        logs=logs,
        usage=usage,
        error=_diagnose(result, server, limits, max_result_bytes),
    )


# What a process prints when an allocation fails under RLIMIT_AS (Python, C, C++, OpenBLAS).
_ALLOCATION_FAILURE = re.compile(r"MemoryError|Cannot allocate memory|bad_alloc|out of memory|failed to allocate", re.I)
# Signals a process dies of when an allocation it did not check fails (or the OOM killer ends it).
_MEMORY_SIGNALS = frozenset({signal.SIGKILL, signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS})


def _diagnose(result: SandboxResult, server: RpcServer, limits: ResourceLimits, cap: int) -> InterpJobError | None:
    """Turn how the runner ended into a clear job error naming its cause (None: it delivered a result).

    In order: a limit the sandbox enforced (wall clock, CPU over all processes, memory cgroup,
    logs, file size); what the host refused or failed at (host time, replies, patches, verbs,
    result size, broken frames, a host failure); what the runner reported (its code's
    exception); and last, how the runner's process ended (a signal is named for what sent it).
    """
    memory_mib = (limits.memory_bytes or 0) // MiB
    t = result.termination
    if t is Termination.TIMEOUT:
        return InterpJobError(
            f"the job ran past its wall-clock limit of {limits.wall_timeout_s:g} s and was killed", code="timeout"
        )
    if t is Termination.CPU_LIMIT:
        return InterpJobError(
            f"the job used up its CPU limit of {limits.cpu_seconds} s (all its processes together, "
            f"{result.cpu_time_s:.2f} s counted) and was killed",
            code="cpu_limit",
        )
    if t is Termination.MEMORY_LIMIT:
        return InterpJobError(
            f"the job's processes together used more than its memory limit of {memory_mib} MiB and the kernel's "
            "out-of-memory killer ended the runner",
            code="memory_limit",
        )
    if t is Termination.OUTPUT_LIMIT:
        return InterpJobError(
            f"the job printed more than {limits.output_bytes} bytes of logs and was killed", code="log_limit"
        )
    if t is Termination.FILE_SIZE_LIMIT:
        return InterpJobError(
            f"the job tried to write a file larger than {limits.file_size_bytes} bytes and was killed",
            code="file_size_limit",
        )
    if server.host_time_spent is not None:
        message, code = server.host_time_spent
        return InterpJobError(f"{message}; the job was stopped", code=code)
    if server.reply_error is not None:
        return InterpJobError(server.reply_error[0], code=server.reply_error[1])
    if server.patch_refused is not None:
        return InterpJobError(f"the host refused a patch: {server.patch_refused}", code=server.patch_refused.code)
    if server.stats.refused:
        return InterpJobError(f"the job's code made a forbidden call: {server.stats.refused[0]}", code="rpc_refused")
    if server.result_too_large is not None:
        return InterpJobError(
            f"the result is {server.result_too_large} bytes; the per-job cap is {cap} bytes", code="result_too_large"
        )
    if server.protocol_error is not None:
        return InterpJobError(f"the runner broke the RPC protocol: {server.protocol_error}", code="protocol_error")
    delivered = result.exit_code == EXIT_OK and server.has_result
    if server.host_failure is not None and not delivered:
        return InterpJobError(
            f"the host failed while answering the runner ({server.host_failure}); the job did not finish",
            code="host_error",
        )
    if server.error is not None:
        kind, message = server.error["type"], server.error["message"]
        if kind == "MemoryError":
            return InterpJobError(f"the job ran out of memory (limit {memory_mib} MiB): {message}", code="memory_limit")
        if kind == "rpc_refused":
            return InterpJobError(f"the host refused a call: {message}", code="rpc_refused")
        return InterpJobError(f"the job's code raised {kind}: {message}", code="code_error")
    if delivered:
        return None
    if result.signal is not None:
        return _signal_error(result, limits)
    if _ALLOCATION_FAILURE.search(result.stderr_text[-4000:]):
        return InterpJobError(
            f"the runner ran out of memory (limit {memory_mib} MiB) before it could report: "
            + _tail(result.stderr_text),
            code="memory_limit",
        )
    if result.exit_code in (EXIT_USER_ERROR, EXIT_PROTOCOL_ERROR):
        return InterpJobError(
            "the runner failed before it could report: " + _tail(result.stderr_text), code="runner_error"
        )
    return InterpJobError(
        f"the runner exited with status {result.exit_code} without a result: {_tail(result.stderr_text)}",
        code="runner_error",
    )


def _signal_error(result: SandboxResult, limits: ResourceLimits) -> InterpJobError:
    """Name what killed the runner by a signal: its memory limit only on evidence, else the signal's sender."""
    sig = result.signal
    assert sig is not None
    try:
        name = signal.Signals(sig).name
    except ValueError:
        name = f"signal {sig}"
    memory_mib = (limits.memory_bytes or 0) // MiB
    if sig in _MEMORY_SIGNALS:
        evidence = None
        if _ALLOCATION_FAILURE.search(result.stderr_text[-4000:]):
            evidence = "an allocation failed just before"
        elif limits.memory_bytes and result.max_rss_kib * 1024 >= 0.9 * limits.memory_bytes:
            evidence = f"its resident memory had reached {result.max_rss_kib // 1024} MiB"
        if evidence:
            return InterpJobError(
                f"the runner ran out of memory (limit {memory_mib} MiB) and died of {name}: {evidence}",
                code="memory_limit",
            )
    if sig == signal.SIGKILL:
        if result.host_oom_kills:
            return InterpJobError(
                "the runner was killed by SIGKILL while the kernel's out-of-memory killer was active on the host "
                "(the host ran short of memory; the job had not reached its own limits)",
                code="killed",
            )
        return InterpJobError(
            "the runner was killed by SIGKILL, but by none of the job's limits (wall clock, CPU, memory, logs): "
            "a process inside the sandbox sent it, or ended the sandbox's init",
            code="killed",
        )
    return InterpJobError(f"the runner died of {name} (signal {sig})", code="killed")


def _tail(text: str, limit: int = 400) -> str:
    text = text.strip()
    return text[-limit:] if text else "(no output)"


def cpu_limit_for(seconds_left: float | None, default: int) -> int:
    """Return a job's CPU-seconds limit: the default, or what the grant's quota has left."""
    if seconds_left is None:
        return default
    return max(1, min(default, int(seconds_left)))
