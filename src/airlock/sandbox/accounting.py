"""CPU and memory accounting over the whole sandbox, every process together: a cgroup v2 per run, else /proc.

CPU seconds are capped for the whole sandbox, not per process: the run gets its own cgroup v2
where the host delegates one (its ``cpu.stat`` counts every process that ever ran in it, and
``cgroup.kill`` ends them all at once; with the memory controller its ``memory.max`` caps the
whole run and its ``memory.events`` counts OOM kills). Otherwise a watcher thread sums the CPU
time of the sandbox's process tree from /proc (live processes and what they reaped) every 100 ms
and faster near the limit. Past the limit the sandbox is killed and the run ends with
:attr:`~airlock.sandbox.Termination.CPU_LIMIT`. Each process also has ``RLIMIT_CPU`` (a catchable
``SIGXCPU`` when one process alone hits it; see :mod:`airlock.sandbox.argv`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CGROUP_SAMPLE_S",
    "PROC_SAMPLE_S",
    "WAITING_SAMPLE_S",
    "Cgroup",
    "CpuWatch",
    "ProcTree",
    "cgroup_parent",
    "host_oom_kills",
]

log = logging.getLogger(__name__)

CGROUP_SAMPLE_S = 0.05
"""How often a run's cgroup CPU counter is read (one small file)."""
PROC_SAMPLE_S = 0.1
"""How often the process tree is sampled without a cgroup (a scan of /proc: about 1.5 ms per 100 host processes)."""
WAITING_SAMPLE_S = 1.0
"""How often a warm run is sampled while it waits for its work (it runs only the platform's runner then)."""
_CGROUP_PREFIX = "airlock-sbx-"
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024
_probe_lock = threading.Lock()
_probed: dict[str, Path | None] = {}


def cgroup_parent(explicit: Path | None = None) -> Path | None:
    """Return the cgroup v2 directory runs get their own cgroup in, or None where none can be made.

    ``explicit`` is a delegated cgroup given by the operator; by default it is this process's own
    cgroup. Probed once per process: the directory must take a new child with ``cgroup.procs``
    and ``cpu.stat``, and its own ``cgroup.procs`` must be writable (moving a process into a
    child needs write access to the common ancestor). Children left by dead processes are removed.
    """
    key = str(explicit or "")
    with _probe_lock:
        if key not in _probed:
            parent = explicit if explicit is not None else _own_cgroup()
            _probed[key] = parent if parent is not None and _delegated(parent) else None
        return _probed[key]


def _own_cgroup() -> Path | None:
    """Return this process's cgroup v2 directory (hybrid hosts included), or None."""
    try:
        groups = Path("/proc/self/cgroup").read_text().splitlines()
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    own = next((line[3:] for line in groups if line.startswith("0::")), None)
    if own is None or not own.startswith("/") or "/.." in own:
        return None  # no cgroup v2, or a cgroup outside this cgroup namespace
    for line in mounts:
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or not right.startswith("cgroup2 ") or len(fields) < 5:
            continue
        root, mount_point = fields[3], fields[4].replace("\\040", " ")
        prefix = root.rstrip("/")
        if own == root or own.startswith(prefix + "/"):
            path = Path(mount_point) / own[len(prefix) :].lstrip("/")
            if path.is_dir():
                return path
    return None


def _delegated(parent: Path) -> bool:
    if not os.access(parent / "cgroup.procs", os.W_OK):
        return False
    _sweep_cgroups(parent)
    probe = parent / f"{_CGROUP_PREFIX}{os.getpid()}-probe-{secrets.token_hex(4)}"
    try:
        probe.mkdir()
    except OSError:
        return False
    try:
        return all((probe / name).is_file() for name in ("cgroup.procs", "cpu.stat"))
    finally:
        with contextlib.suppress(OSError):
            probe.rmdir()


def _sweep_cgroups(parent: Path) -> None:
    """Remove run cgroups whose creating process is gone (it died before it could)."""
    for child in parent.glob(_CGROUP_PREFIX + "*"):
        owner = child.name[len(_CGROUP_PREFIX) :].partition("-")[0]
        if not owner.isdigit() or int(owner) == os.getpid():
            continue
        try:
            os.kill(int(owner), 0)
            continue
        except ProcessLookupError:
            pass
        except OSError:
            continue
        Cgroup(child).remove()


class Cgroup:
    """One run's own cgroup v2: the CPU time of every process that was ever in it, its OOM kills, a kill switch."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.peak_rss_kib = 0
        """The largest resident memory of its processes seen at a sample (KiB; ``memory.peak`` where kept)."""

    @classmethod
    def create(cls, parent: Path, memory_bytes: int | None) -> Cgroup:
        """Make a fresh cgroup under ``parent`` (capping the memory of the whole run where the controller is on)."""
        group = cls(parent / f"{_CGROUP_PREFIX}{os.getpid()}-{secrets.token_hex(6)}")
        group.path.mkdir()
        try:
            if memory_bytes is not None and "memory" in group._read("cgroup.controllers").split():
                group._write("memory.max", str(memory_bytes))
                if (group.path / "memory.swap.max").exists():
                    group._write("memory.swap.max", "0")
        except OSError:
            group.remove()
            raise
        return group

    def _read(self, name: str) -> str:
        return (self.path / name).read_text()

    def _write(self, name: str, value: str) -> None:
        # One write(2) per value: cgroup files take one value per call.
        fd = os.open(self.path / name, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)

    def add(self, pid: int) -> None:
        """Move ``pid`` into this cgroup (its future children are born in it)."""
        self._write("cgroup.procs", str(pid))

    def pids(self) -> list[int]:
        """Return the processes now in this cgroup."""
        return [int(line) for line in self._read("cgroup.procs").split()]

    def cpu_seconds(self) -> float:
        """Return the CPU time of every process that ran in this cgroup, exited ones included."""
        for line in self._read("cpu.stat").splitlines():
            name, _, value = line.partition(" ")
            if name == "usage_usec":
                return int(value) / 1e6
        raise ValueError(f"{self.path}/cpu.stat has no usage_usec")

    def sample(self) -> tuple[float, float]:
        """Return :meth:`cpu_seconds` and its lag behind the truth (none: the kernel counts in nanoseconds).

        Each sample also notes the processes' resident memory, for :meth:`peak_memory_kib`.
        """
        rss_pages = 0
        for pid in self.pids():
            stat_ = _proc_stat(pid)
            rss_pages += stat_.rss_pages if stat_ is not None else 0
        self.peak_rss_kib = max(self.peak_rss_kib, rss_pages * _PAGE_KIB)
        return self.cpu_seconds(), 0.0

    def peak_memory_kib(self) -> int:
        """Return the run's peak memory: the kernel's ``memory.peak`` where kept, else the samples' peak."""
        with contextlib.suppress(OSError, ValueError):
            return max(int(self._read("memory.peak")) // 1024, self.peak_rss_kib)
        return self.peak_rss_kib

    def oom_kills(self) -> int:
        """Return how many of its processes the OOM killer killed (0 without the memory controller)."""
        try:
            text = self._read("memory.events")
        except OSError:
            return 0
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name == "oom_kill":
                return int(value)
        return 0

    def kill(self) -> None:
        """SIGKILL every process in the cgroup at once (``cgroup.kill``; one by one on kernels before 5.14)."""
        try:
            self._write("cgroup.kill", "1")
            return
        except FileNotFoundError:
            pass
        except OSError:
            return  # already removed
        with contextlib.suppress(OSError):
            for pid in self.pids():
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)

    def remove(self) -> None:
        """Delete the cgroup once its processes are gone (killing stragglers; leftovers are swept later)."""
        for attempt in range(50):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                if attempt == 0:
                    self.kill()
                time.sleep(0.002)
        log.warning("sandbox: could not remove cgroup %s; it is removed at the next start", self.path)


@dataclass(frozen=True)
class _ProcStat:
    ppid: int
    start: int
    ticks: int
    """utime + stime of the process (all its threads) + cutime + cstime (the children it reaped)."""
    rss_pages: int = 0


def _proc_stat(pid: int) -> _ProcStat | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            data = handle.read()
    except OSError:
        return None
    # The command name is in parentheses and may itself contain spaces and parentheses.
    fields = data[data.rfind(b")") + 2 :].split()
    try:
        return _ProcStat(
            ppid=int(fields[1]),
            start=int(fields[19]),
            ticks=sum(int(v) for v in fields[11:15]),
            rss_pages=int(fields[21]),
        )
    except (IndexError, ValueError):
        return None


class ProcTree:
    """CPU accounting over the process tree below one root (the sandbox's init), from /proc.

    Every process of the sandbox's PID namespace descends from its init (orphans are reparented
    to it or to a subreaper below it), so the tree covers them all. A process's time is its own
    plus the ``cutime``/``cstime`` of the children it reaped, so exited processes still count.
    """

    def __init__(self, root: int) -> None:
        self.root = root
        self.peak_rss_kib = 0
        """The largest resident memory of the whole tree seen at a sample (KiB; a lower bound of the true peak)."""

    def _tree(self) -> list[tuple[int, int]]:
        """Return (pid, start time) of the root and its descendants, parents before children."""
        children: dict[int, list[tuple[int, int]]] = {}
        root_start: int | None = None
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            stat_ = _proc_stat(int(name))
            if stat_ is None:
                continue
            if int(name) == self.root:
                root_start = stat_.start
            children.setdefault(stat_.ppid, []).append((int(name), stat_.start))
        if root_start is None:
            return []
        order = [(self.root, root_start)]
        for pid, _start in order:  # grows while iterated: a breadth-first walk
            order.extend(children.get(pid, ()))
        return order

    def pids(self) -> list[int]:
        """Return the root and its descendants, parents first."""
        return [pid for pid, _start in self._tree()]

    def sample(self) -> tuple[float, float]:
        """Return the CPU time of the tree (exited processes included) and how far it may lag the truth.

        The tree is read first, then each process again parents before children: a child reaped
        in between is then missed once (counted in the next sample) instead of counted twice (in
        its own line and its parent's ``cutime``), so a sample never exceeds the true total.
        /proc counts in clock ticks, each process's total rounded down: the lag is one tick per
        process read.
        """
        ticks = processes = rss_pages = 0
        for pid, start in self._tree():
            stat_ = _proc_stat(pid)
            if stat_ is not None and stat_.start == start:  # not a recycled PID
                ticks += stat_.ticks
                rss_pages += stat_.rss_pages
                processes += 1
        self.peak_rss_kib = max(self.peak_rss_kib, rss_pages * _PAGE_KIB)
        return ticks / _CLK_TCK, processes / _CLK_TCK


class CpuWatch:
    """A thread that samples a sandbox's CPU time and kills the sandbox when it reaches the limit.

    It samples every ``interval`` seconds while far from the limit and faster near it: the
    sandbox cannot burn more than one CPU-second per second per core it may run on, so waiting
    ``(limit - used) / cores`` never lets it pass the limit unseen by more than the sampling
    floor (5 ms) times the cores. ``meter`` returns the time counted and how far that may lag
    the truth; the sandbox is killed once their sum reaches the limit (so never late by the lag).
    A warm run waiting for its work is sampled every ``waiting_interval`` until :meth:`work_started`
    (that bound still holds meanwhile, so the limit is kept just the same; only idle CPU is saved).
    """

    def __init__(
        self,
        meter: Callable[[], tuple[float, float]],
        limit: float,
        interval: float,
        *,
        kill: Callable[[], None],
        wake: Callable[[], None],
        waiting_interval: float | None = None,
    ) -> None:
        self.meter = meter
        self.limit = limit
        self.interval = interval
        self._pace = interval if waiting_interval is None else max(waiting_interval, interval)
        self.kill = kill
        self.wake = wake
        self.exceeded = False
        self.used = 0.0
        """CPU seconds counted at the last sample."""
        self.lag = 0.0
        # Every CPU of the machine, not this process's affinity: sandboxed code may widen its own.
        self.cores = os.cpu_count() or 1
        self._stopped = False
        self._nudge = threading.Event()
        self._thread = threading.Thread(target=self._run, name="airlock-sandbox-cpu", daemon=True)

    def start(self) -> None:
        """Start sampling."""
        self._thread.start()

    def work_started(self) -> None:
        """Sample every ``interval`` from now on (a warm run has been handed its work)."""
        self._pace = self.interval
        self._nudge.set()

    def stop(self) -> None:
        """Stop sampling and wait for the thread (it never signals anything after this returns)."""
        self._stopped = True
        self._nudge.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            if self._nudge.wait(min(self._pace, max((self.limit - self.used - self.lag) / self.cores, 0.005))):
                self._nudge.clear()
            if self._stopped:
                return
            try:
                self.used, self.lag = self.meter()
            except (OSError, ValueError):
                continue  # the sandbox is ending
            if self.used + self.lag >= self.limit:
                self.exceeded = True
                self.kill()
                self.wake()
                return


def host_oom_kills() -> int:
    """Return the host's count of OOM kills so far (``oom_kill`` in /proc/vmstat; 0 where absent)."""
    try:
        with open("/proc/vmstat", "rb") as handle:
            for line in handle:
                if line.startswith(b"oom_kill "):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0
