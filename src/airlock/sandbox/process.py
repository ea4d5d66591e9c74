"""Running one sandboxed command: spawn bwrap, feed and capture it, enforce its limits, reap it with its usage.

* bwrap starts as the sandbox's host uid (a root-run Airlock drops to it before bwrap starts), in its
  own session, with synthetic files, its status stream and a block pipe passed as inherited
  descriptors; the sandbox waits on the block pipe until it is in its cgroup (when it has one);
* a wall-clock timeout kills the whole sandbox (its PID namespace dies with its init) and each
  output stream is capped in bytes; killing escalates from SIGTERM to the init (which kills and
  reaps everything, so CPU time is still accounted) to SIGKILL to the init, then to bwrap;
* bwrap reaps every process of the sandbox, so ``wait4`` on it reports the CPU time of them all;
  :mod:`airlock.sandbox.accounting` counts it while the run lasts and ends the run at the limit;
* a cancelled run never leaves a sandbox, a cgroup or a zombie behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import resource
import signal
import subprocess
import time
from collections.abc import Callable
from typing import Any

from airlock.sandbox.accounting import (
    CGROUP_SAMPLE_S,
    PROC_SAMPLE_S,
    WAITING_SAMPLE_S,
    Cgroup,
    CpuWatch,
    ProcTree,
    cgroup_parent,
    host_oom_kills,
)
from airlock.sandbox.argv import BwrapCommand
from airlock.sandbox.errors import SandboxError
from airlock.sandbox.policy import ResourceLimits, SandboxPolicy, SandboxResult, Termination

__all__ = ["Run"]

log = logging.getLogger(__name__)

_STATUS_CAP = 64 * 1024
_PIPE_GRACE_S = 2.0
_KILL_GRACE_S = 1.0


class _Capture(asyncio.Protocol):
    """Collects one output stream up to a byte cap; reports the first overflow."""

    def __init__(self, cap: int, on_overflow: asyncio.Event) -> None:
        self.cap = cap
        self.buffer = bytearray()
        self.truncated = False
        self.on_overflow = on_overflow
        self.closed = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        room = self.cap - len(self.buffer)
        if len(data) > room:
            self.buffer += data[: max(room, 0)]
            self.truncated = True
            self.on_overflow.set()
        else:
            self.buffer += data

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


class _Status(_Capture):
    """bwrap's ``--json-status-fd`` stream: learns the sandbox init's host PID as soon as it starts."""

    def __init__(self) -> None:
        super().__init__(_STATUS_CAP, asyncio.Event())
        self.init_pidfd: int | None = None
        self.init_pid: int | None = None
        self.exit_code: int | None = None
        self.started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        """Done once bwrap has reported the sandbox init (or its status stream ended without it)."""

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        for line in bytes(self.buffer).splitlines():
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if not isinstance(doc, dict):
                continue
            if "child-pid" in doc and self.init_pidfd is None:
                pid = int(doc["child-pid"])
                self.init_pidfd = _open_init(pid, doc.get("pid-namespace"))
                if self.init_pidfd is not None:
                    self.init_pid = pid
                if not self.started.done():
                    self.started.set_result(None)
            if "exit-code" in doc:
                self.exit_code = int(doc["exit-code"])

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if not self.started.done():
            self.started.set_result(None)

    def close_pidfd(self) -> None:
        if self.init_pidfd is not None:
            os.close(self.init_pidfd)
            self.init_pidfd = None


def _open_init(pid: int, pid_namespace: object) -> int | None:
    """Return a pidfd for the sandbox's init, verified to live in the sandbox's PID namespace."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return None
    # The pidfd pins the process; the namespace check rules out a recycled PID (the init
    # could in principle have exited and been reaped before we opened it).
    try:
        if os.stat(f"/proc/{pid}/ns/pid").st_ino == pid_namespace:
            return pidfd
    except OSError:
        pass
    os.close(pidfd)
    return None


class _Feeder(asyncio.BaseProtocol):
    """Write side of stdin; a command that exits without reading it is not an error."""

    def connection_lost(self, exc: Exception | None) -> None:
        return None


class Run:
    """One sandboxed process: spawn, feed, capture, time out, reap with resource usage.

    bwrap runs as ``host_uid``/``host_gid`` (None: the caller's own); ``inherit`` are the caller's
    descriptors the command gets under the same numbers.
    """

    def __init__(
        self,
        command: BwrapCommand,
        policy: SandboxPolicy,
        stdin: bytes | None,
        wall: float,
        cap: int,
        *,
        bwrap: str,
        host_uid: int | None,
        host_gid: int | None,
        inherit: tuple[int, ...] = (),
        start_clock: asyncio.Event | None = None,
        idle_timeout: float = 0.0,
    ) -> None:
        self.command = command
        self.start_clock = start_clock
        self.idle_timeout = idle_timeout
        self.policy = policy
        self.bwrap = bwrap
        self.host_uid = host_uid
        self.host_gid = host_gid
        self.stdin = stdin
        self.wall = wall
        self.cap = cap
        self.inherit = inherit
        self.block_write: int | None = None
        self.spawn_rss_kib = 0
        """This process's resident memory when bwrap was forked from it (what a fork's peak may be)."""
        """Write end of bwrap's --block-fd: the sandbox waits on it, set up but before its command starts."""

    def _spawn(self) -> tuple[subprocess.Popen[bytes], int]:
        argv = list(self.command.argv)
        self.spawn_rss_kib = resident_kib()
        pass_fds: list[int] = []
        try:
            # Synthetic files go through pipes that bwrap reads and closes during setup; they
            # are tiny, so writing before the spawn cannot block.
            for target, contents in self.command.data_files.items():
                read_end, write_end = os.pipe()
                pass_fds.append(read_end)
                os.write(write_end, contents)
                os.close(write_end)
                argv[argv.index("{fd:" + target + "}")] = str(read_end)
            status_read, status_write = os.pipe()
            pass_fds.append(status_write)
            block_read, self.block_write = os.pipe()
            pass_fds.append(block_read)
            argv[1:1] = ["--json-status-fd", str(status_write), "--block-fd", str(block_read)]
            ids: dict[str, Any] = {}
            if self.host_uid is not None:
                # Drop root before bwrap even starts: bwrap then runs unprivileged in its own
                # user namespace, and the kernel enforces RLIMIT_NPROC for this uid.
                ids = {"user": self.host_uid, "group": self.host_gid, "extra_groups": []}
            try:
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.PIPE if self.stdin is not None else subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    env={},  # bwrap itself needs nothing from the host environment
                    # The caller's descriptors cross too (bwrap and the init leave inherited
                    # descriptors open); they are the caller's to close, unlike ours below.
                    pass_fds=[*pass_fds, *self.inherit],
                    start_new_session=True,
                    close_fds=True,
                    **ids,
                )
            except PermissionError as exc:
                os.close(status_read)
                self._release()
                raise SandboxError(
                    f"cannot start {self.bwrap} as uid {self.host_uid}: {exc}; every directory "
                    "on its path must be world-executable (or set AIRLOCK_BWRAP)"
                ) from exc
            return proc, status_read
        finally:
            for fd in pass_fds:
                os.close(fd)

    def _release(self) -> None:
        """Let the sandbox run its command (closing the pipe releases it just as well)."""
        if self.block_write is not None:
            with contextlib.suppress(OSError):
                os.write(self.block_write, b"1")
            os.close(self.block_write)
            self.block_write = None

    def _make_cgroup(self) -> Cgroup | None:
        policy = self.policy
        if policy.cpu_accounting == "proc" or policy.limits.cpu_seconds is None:
            return None
        parent = cgroup_parent(policy.cgroup_parent)
        if parent is not None:
            try:
                return Cgroup.create(parent, policy.limits.memory_bytes)
            except OSError as exc:
                if policy.cpu_accounting == "cgroup":
                    raise SandboxError(f"cannot create a cgroup for the sandbox under {parent}: {exc}") from exc
                log.warning("sandbox: no cgroup under %s (%s); counting CPU over the process tree", parent, exc)
                return None
        if policy.cpu_accounting == "cgroup":
            raise SandboxError(
                "no writable cgroup v2 for the sandbox (cpu_accounting='cgroup'): delegate one and set cgroup_parent, "
                "or use 'auto'"
            )
        return None

    async def _admit(self, exited: asyncio.Future[Any], status: _Status, cgroup: Cgroup | None) -> Cgroup | None:
        """Wait until bwrap has made the sandbox (its command not yet started), put it in its cgroup, release it.

        Only the sandbox's own processes go into the cgroup, not bwrap's monitor outside it: a
        kill of the cgroup (or its OOM killer) then ends the sandbox and bwrap still reports it.
        """
        try:
            await asyncio.wait({status.started, exited}, timeout=self.wall, return_when=asyncio.FIRST_COMPLETED)
            if cgroup is not None and status.init_pid is not None:
                try:
                    for pid in ProcTree(status.init_pid).pids():
                        cgroup.add(pid)
                except OSError as exc:
                    if self.policy.cpu_accounting == "cgroup":
                        raise SandboxError(f"cannot move the sandbox into its cgroup {cgroup.path}: {exc}") from exc
                    log.warning(
                        "sandbox: cannot use cgroup %s (%s); counting CPU over the process tree", cgroup.path, exc
                    )
                    cgroup.remove()
                    cgroup = None
            return cgroup
        finally:
            self._release()

    async def execute(self) -> SandboxResult:
        """Run the command to its end or its first limit; raise :class:`SandboxError` if bwrap fails to set up."""
        loop = asyncio.get_running_loop()
        limits = self.policy.limits
        overflow = asyncio.Event()
        cpu_over = asyncio.Event()
        out = _Capture(self.cap, overflow)
        err = _Capture(self.cap, overflow)
        status = _Status()
        cgroup = self._make_cgroup()
        oom_before = host_oom_kills()
        started = time.monotonic()
        try:
            proc, status_fd = self._spawn()
        except BaseException:
            if cgroup is not None:
                cgroup.remove()
            raise
        status_pipe = os.fdopen(status_fd, "rb", buffering=0)
        transports: list[asyncio.BaseTransport] = []
        exited: asyncio.Future[tuple[int, resource.struct_rusage]] | None = None
        reaped: tuple[int, resource.struct_rusage] | None = None
        watch: CpuWatch | None = None
        tree: ProcTree | None = None
        termination = Termination.EXITED
        clock_started: float | None = None
        waiters: list[asyncio.Future[Any]] = []
        try:
            assert proc.stdout is not None and proc.stderr is not None
            for pipe, protocol in ((proc.stdout, out), (proc.stderr, err), (status_pipe, status)):
                reader, _ = await loop.connect_read_pipe(functools.partial(_same, protocol), pipe)
                transports.append(reader)
            if proc.stdin is not None and self.stdin is not None:
                writer, _ = await loop.connect_write_pipe(_Feeder, proc.stdin)
                transports.append(writer)
                writer.write(self.stdin)
                writer.close()
            exited = asyncio.ensure_future(_wait_exit(proc.pid))
            cgroup = await self._admit(exited, status, cgroup)
            if limits.cpu_seconds is not None and status.init_pid is not None:
                meter: Callable[[], tuple[float, float]]
                if cgroup is not None:
                    meter = cgroup.sample
                else:
                    tree = ProcTree(status.init_pid)  # also keeps the sandbox's peak memory
                    meter = tree.sample
                watch = CpuWatch(
                    meter,
                    float(limits.cpu_seconds),
                    CGROUP_SAMPLE_S if cgroup is not None else PROC_SAMPLE_S,
                    kill=functools.partial(_kill_sandbox, cgroup, status),
                    wake=functools.partial(_wake, loop, cpu_over),
                    waiting_interval=WAITING_SAMPLE_S if self.start_clock is not None else None,
                )
                watch.start()
            overflowed = asyncio.ensure_future(overflow.wait())
            over_cpu = asyncio.ensure_future(cpu_over.wait())
            waiters.extend((overflowed, over_cpu))
            if self.start_clock is not None:
                # A warm run: its command is up and waits for work; its wall clock starts only
                # when that work is handed over, and it waits at most ``idle_timeout`` for it.
                clock = asyncio.ensure_future(self.start_clock.wait())
                waiters.append(clock)
                waited = {exited, overflowed, over_cpu, clock}
                idle_left = max(self.idle_timeout - (time.monotonic() - started), 0.0)
                await asyncio.wait(waited, timeout=idle_left, return_when="FIRST_COMPLETED")
                clock.cancel()
                if watch is not None:
                    watch.work_started()
                # Idle past its limit (or ended before its work came): no wall clock is left.
                clock_started = time.monotonic() if self.start_clock.is_set() else started - self.wall
            else:
                clock_started = started
            left = max(self.wall - (time.monotonic() - clock_started), 0.0)
            done, _ = await asyncio.wait({exited, overflowed, over_cpu}, timeout=left, return_when="FIRST_COMPLETED")
            overflowed.cancel()
            over_cpu.cancel()
            if watch is not None and watch.exceeded:
                termination = Termination.CPU_LIMIT
            elif exited not in done:
                termination = Termination.OUTPUT_LIMIT if overflow.is_set() else Termination.TIMEOUT
            if not exited.done():
                # Escalate: SIGTERM asks the init to kill and reap everything (so CPU time is
                # still accounted), SIGKILL to the init makes the kernel kill the whole PID
                # namespace, and killing bwrap's monitor is the last resort. Past the CPU limit
                # with a cgroup, the watcher has already killed it all (the cgroup keeps the count).
                steps = (
                    (signal.SIGKILL, None)
                    if termination is Termination.CPU_LIMIT and cgroup is not None
                    else (signal.SIGTERM, signal.SIGKILL, None)
                )
                for step in steps:
                    if step is None or not _signal_init(status, step):
                        _kill(proc.pid)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(_KILL_GRACE_S):
                            await asyncio.shield(exited)
                    if exited.done():
                        break
            reaped = await exited
            # The PID namespace is gone once bwrap exits, so the pipes close promptly; the
            # grace period only guards against a stuck writer.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_PIPE_GRACE_S):
                    await asyncio.gather(out.closed, err.closed, status.closed)
        finally:
            for waiter in waiters:  # a cancelled run leaves no pending task behind
                waiter.cancel()
            if watch is not None:
                watch.stop()  # before the pidfd it may signal through is closed
                if watch.exceeded:
                    termination = Termination.CPU_LIMIT
            self._release()
            if reaped is None:
                # Cancelled or failed mid-run: never leave a sandbox (or a zombie) behind.
                if exited is not None:
                    exited.cancel()
                if cgroup is not None:
                    cgroup.kill()
                proc.returncode = _reap_now(proc.pid, killed_init=_signal_init(status, signal.SIGKILL))
            status.close_pidfd()
            for transport in transports:
                transport.close()
            status_pipe.close()
            cgroup_cpu, oom_killed = 0.0, False
            peak_kib = tree.peak_rss_kib if tree is not None else 0
            if cgroup is not None:
                with contextlib.suppress(OSError, ValueError):
                    cgroup_cpu, oom_killed = cgroup.cpu_seconds(), cgroup.oom_kills() > 0
                peak_kib = cgroup.peak_memory_kib()
                cgroup.remove()
        wall_time = time.monotonic() - (started if clock_started is None else max(clock_started, started))
        wait_status, usage = reaped
        proc.returncode = exit_code = _exit_code(wait_status)
        if termination is Termination.EXITED:
            if status.exit_code is None:
                # bwrap exited without running the command to its end: a setup error (a
                # missing mount source, no user namespaces, ...).
                detail = err.buffer.decode(errors="replace").strip()
                raise SandboxError(f"bwrap failed to set up the sandbox: {detail or f'exit status {exit_code}'}")
            exit_code = status.exit_code
        else:
            exit_code = 128 + signal.SIGKILL
        # wait4 covers every process bwrap reaped; the cgroup also what it could not (never less),
        # and the watcher's last sample is a floor when the kernel reaped a killed PID namespace.
        cpu = max(usage.ru_utime + usage.ru_stime, cgroup_cpu, watch.used if watch is not None else 0.0)
        return SandboxResult(
            exit_code=exit_code,
            stdout=bytes(out.buffer),
            stderr=bytes(err.buffer),
            stdout_truncated=out.truncated,
            stderr_truncated=err.truncated,
            wall_time_s=wall_time,
            cpu_time_s=cpu,
            max_rss_kib=_sandbox_peak_rss(usage.ru_maxrss, self.spawn_rss_kib, peak_kib),
            termination=_classify(termination, exit_code, cpu, limits, oom_killed),
            cpu_accounting=None if watch is None else ("cgroup" if cgroup is not None else "proc"),
            oom_killed=oom_killed,
            host_oom_kills=max(host_oom_kills() - oom_before, 0),
        )


def _reap_now(pid: int, *, killed_init: bool) -> int | None:
    """Reap bwrap synchronously (we may be cancelled and unable to await)."""
    if killed_init:
        # Give bwrap's monitor a moment to reap the dead init itself, so nothing of the
        # sandbox is left for the host's init to collect; this takes milliseconds.
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                found, wait_status, _usage = os.wait4(pid, os.WNOHANG)
                if found:
                    return _exit_code(wait_status)
            time.sleep(0.002)
    _kill(pid)
    try:
        _, wait_status, _usage = os.wait4(pid, 0)
    except ChildProcessError:
        return None
    return _exit_code(wait_status)


def _signal_init(status: _Status, sig: signal.Signals) -> bool:
    """Signal the sandbox's init through its pidfd; False when there is no usable pidfd."""
    if status.init_pidfd is None:
        return False
    try:
        signal.pidfd_send_signal(status.init_pidfd, sig)
    except ProcessLookupError:
        pass  # already gone
    except OSError:
        return False
    return True


def _same(protocol: _Capture) -> _Capture:
    return protocol


def _classify(
    termination: Termination, exit_code: int, cpu: float, limits: ResourceLimits, oom_killed: bool = False
) -> Termination:
    """Name a limit from how the command died (bwrap reports death by signal N as 128 + N)."""
    sig = exit_code - 128
    if termination is not Termination.EXITED or not 0 < sig < signal.NSIG:
        return termination
    if sig == signal.SIGKILL and oom_killed:
        return Termination.MEMORY_LIMIT
    if sig == signal.SIGXCPU or (
        sig == signal.SIGKILL and limits.cpu_seconds is not None and cpu >= limits.cpu_seconds
    ):
        return Termination.CPU_LIMIT
    if sig == signal.SIGXFSZ:
        return Termination.FILE_SIZE_LIMIT
    return Termination.SIGNALED


async def _wait_exit(pid: int) -> tuple[int, resource.struct_rusage]:
    """Wait for ``pid`` without blocking the loop, then reap it with its resource usage."""
    loop = asyncio.get_running_loop()
    try:
        pidfd: int | None = os.pidfd_open(pid)
    except OSError:  # pragma: no cover - kernels before 5.3: poll instead
        pidfd = None
    if pidfd is not None:
        ready: asyncio.Future[None] = loop.create_future()

        def _ready() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_reader(pidfd, _ready)
        try:
            await ready
        finally:
            loop.remove_reader(pidfd)
            os.close(pidfd)
    while True:
        # wait4 (not asyncio's child watcher) because only it reports the CPU time of the
        # whole sandbox: bwrap reaps every process in it, so its usage includes theirs.
        found, wait_status, usage = os.wait4(pid, os.WNOHANG)
        if found:
            return wait_status, usage
        await asyncio.sleep(0.01)


def _kill(pid: int) -> None:
    # bwrap leads its own session and process group; killing it kills its in-sandbox init
    # (--die-with-parent), and with that init the kernel kills the whole PID namespace.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _exit_code(wait_status: int) -> int:
    code = os.waitstatus_to_exitcode(wait_status)
    return 128 - code if code < 0 else code


def _kill_sandbox(cgroup: Cgroup | None, status: _Status) -> None:
    """End the whole sandbox past its CPU limit.

    With a cgroup: SIGKILL to all of it at once (its ``cpu.stat`` keeps the count). Without one:
    SIGTERM to the init, which SIGKILLs every other process and reaps them, so their CPU time
    reaches wait4; a PID namespace ended by SIGKILL to its init is reaped by the kernel without
    that accounting. The run's escalation follows with SIGKILL if the init does not end.
    """
    if cgroup is not None:
        cgroup.kill()
        _signal_init(status, signal.SIGKILL)
    else:
        _signal_init(status, signal.SIGTERM)


def _wake(loop: asyncio.AbstractEventLoop, event: asyncio.Event) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closing: the run is over anyway
        loop.call_soon_threadsafe(event.set)


def resident_kib() -> int:
    """Return this process's resident memory now, in KiB (0 where /proc cannot tell)."""
    try:
        with open("/proc/self/statm", "rb") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
    except (OSError, ValueError, IndexError):
        return 0


def _sandbox_peak_rss(reaped_peak_kib: int, spawn_rss_kib: int, sampled_peak_kib: int) -> int:
    """Return the sandbox's peak resident memory in KiB, or 0 when it cannot be told.

    bwrap is forked from this process, and the kernel keeps a process's high-water mark across
    exec: a reaped peak no higher than what this process held at the fork may be the fork's own
    (a gateway holding a model's weights), not the sandbox's. The /proc sampler's peak, taken
    only from processes inside the sandbox (or the cgroup's own peak), never has that problem.
    """
    trusted = reaped_peak_kib if reaped_peak_kib > spawn_rss_kib else 0
    return max(trusted, sampled_peak_kib)
