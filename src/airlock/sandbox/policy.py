"""What a sandboxed run may see and use, and what it reports: policy, limits, mounts, results.

Plain data, shared by every other module of the package: a :class:`SandboxPolicy` (with its
:class:`ResourceLimits` and extra :class:`Mount` s) is fixed per :class:`~airlock.sandbox.BwrapSandbox`,
and every run ends in a :class:`SandboxResult` whose :class:`Termination` names the wall it hit.
"""

from __future__ import annotations

import enum
import signal
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from airlock.sandbox.seccomp import SYSCALLS_X86_64

__all__ = [
    "NOBODY_GID",
    "NOBODY_UID",
    "SANDBOX_GID",
    "SANDBOX_UID",
    "SANDBOX_USER",
    "MiB",
    "Mount",
    "ResourceLimits",
    "SandboxPolicy",
    "SandboxResult",
    "Termination",
]

MiB = 1024 * 1024
# Inside the sandbox the command runs as this uid/gid; the name only matters to tools like `id`.
SANDBOX_UID = 1000
SANDBOX_GID = 1000
SANDBOX_USER = "sandbox"
# The unprivileged host account a root-run Airlock drops to before starting bwrap.
NOBODY_UID = 65534
NOBODY_GID = 65534


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
        unknown = sorted(set(value) - set(SYSCALLS_X86_64))
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
    """Peak resident memory of the sandbox's processes in KiB, as far as it can be told apart from the
    host process bwrap was forked from (a lower bound; 0 when unknown)."""
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
