"""The bubblewrap command line of one run: ``bwrap <containment> -- bash <init> prlimit <limits> -- <command>``.

* the command sees an empty root with read-only system directories, a synthetic ``/etc``
  (user database, linker cache, alternatives), private ``/proc`` and ``/dev``, size-capped
  tmpfs ``/tmp`` and ``/dev/shm``, and one writable work directory at ``/work``; nothing of
  the host's home, Airlock's data dir or the model weights is mounted;
* it has no network (an empty network namespace: only its own loopback), its own PID, IPC,
  UTS and cgroup namespaces, no capabilities, a cleared environment and no way to create
  further user namespaces;
* address space, processes, file size, open files and per-process CPU are capped with rlimits
  set inside the sandbox just before the command starts (``prlimit``);
* no process outlives the run: the sandbox's init kills and reaps whatever the command left
  behind, which also makes the reported CPU time cover every process that ran.

Building is pure apart from reading the host's filesystem layout: nothing runs until
:mod:`airlock.sandbox.process` spawns the result.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import re
import stat
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from airlock.config import get_settings
from airlock.sandbox.discovery import SYSTEM_PATH
from airlock.sandbox.errors import SandboxError
from airlock.sandbox.policy import NOBODY_GID, NOBODY_UID, SANDBOX_GID, SANDBOX_UID, SANDBOX_USER, SandboxPolicy
from airlock.sandbox.seccomp import seccomp_filter

__all__ = ["BwrapCommand", "build_command"]

# Top-level system entries: bound read-only when a directory, recreated when a symlink (merged /usr).
_SYSTEM_ROOTS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# The only host /etc entries the sandbox sees: the dynamic linker's configuration, Debian's
# alternatives symlinks (awk, which, ...), libmagic's local rules and the system Python's
# sitecustomize. No passwd, shadow, hosts, resolver, certificates or credentials.
_ETC_ENTRIES = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "alternatives", "magic", "magic.mime", "localtime")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
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


@dataclass
class BwrapCommand:
    """A built command line plus the data bwrap reads from inherited pipes (synthetic files)."""

    argv: list[str]
    data_files: dict[str, bytes] = field(default_factory=dict)
    """Sandbox path -> contents, passed with ``--ro-bind-data`` (placeholders ``{fd:path}`` in argv)."""


def _forbidden_roots() -> list[Path]:
    """Paths no mount may expose wholesale: the host home, the data dir, the artifact store, the weights cache."""
    settings = get_settings()
    roots = [settings.home_dir, settings.model_cache_dir, settings.artifacts_dir]
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


def build_command(
    argv: Sequence[str],
    policy: SandboxPolicy,
    *,
    bwrap: str,
    prlimit: str,
    init_shell: str,
    host_uid: int | None,
    workdir: Path | None = None,
    tmpdir: Path | None = None,
    cwd: str | None = None,
    env: Mapping[str, str] | None = None,
) -> BwrapCommand:
    """Return the full bwrap command line for ``argv`` under ``policy``, with bwrap running as ``host_uid``.

    ``bwrap``, ``prlimit`` and ``init_shell`` are the executables to use (the latter two run
    inside the sandbox); ``host_uid`` is the host uid bwrap runs as (None: the caller's), which
    every mount source must be reachable by.
    """
    if not argv:
        raise ValueError("empty command")
    limits = policy.limits
    forbidden = _forbidden_roots()
    work = policy.workdir_target
    data: dict[str, bytes] = {}
    args: list[str] = [bwrap]

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
        args += ["--bind", str(_check_source(tmpdir, forbidden, host_uid=host_uid)), "/tmp"]
    else:
        args += ["--size", str(limits.tmp_bytes), "--tmpfs", "/tmp"]
    # 5d. The one writable host directory (or an in-memory one).
    if workdir is not None:
        args += ["--bind", str(_check_source(workdir, forbidden, host_uid=host_uid)), work]
    else:
        args += ["--size", str(limits.tmp_bytes), "--tmpfs", work]
    # 5e. Opt-in read-only extras: this interpreter's prefix, caller mounts.
    for root in python_roots:
        args += ["--ro-bind", str(_check_source(root, forbidden, host_uid=host_uid)), str(root)]
    for mount in policy.mounts:
        args += [
            "--bind" if mount.writable else "--ro-bind",
            str(_check_source(mount.source, forbidden, host_uid=host_uid)),
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
    args += ["--as-pid-1", "--", init_shell, "-p", "-c", _INIT_SCRIPT, "airlock-init"]
    args += [prlimit, *limit_args, "--", *argv]
    return BwrapCommand(argv=args, data_files=data)
