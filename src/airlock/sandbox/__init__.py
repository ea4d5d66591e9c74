"""Reusable bubblewrap sandbox: run untrusted commands with no network, a read-only system and rlimits.

Used by the Inspect sandbox environment (``airlock-bwrap``) for agentic eval suites and by the
remote-interpretability runner: every place Airlock runs code it did not write. Modules, each
importing only those listed before it:

* ``errors``: :class:`SandboxError`, what every module raises;
* ``seccomp``: the optional deny-list of system calls and its BPF program;
* ``policy``: what a run may see and use (:class:`SandboxPolicy`, :class:`ResourceLimits`,
  :class:`Mount`) and what it reports (:class:`SandboxResult`, :class:`Termination`);
* ``discovery``: the bwrap binary and the system tools the sandbox runs;
* ``argv``: the bwrap command line, which holds the containment itself;
* ``accounting``: CPU time (and OOM kills) of the whole sandbox, from a cgroup v2 or /proc;
* ``process``: spawning, feeding, capturing, limiting and reaping one run;
* ``bwrap``: :class:`BwrapSandbox`, the entry point tying them together;
* ``files``: host-side access to what sandboxed code wrote, never following its symlinks.
"""

from airlock.sandbox.accounting import cgroup_parent
from airlock.sandbox.argv import BwrapCommand
from airlock.sandbox.bwrap import BwrapSandbox
from airlock.sandbox.discovery import bwrap_version, find_bwrap
from airlock.sandbox.errors import SandboxError
from airlock.sandbox.files import ensure_regular, remove_tree, safe_open_beneath
from airlock.sandbox.policy import (
    SANDBOX_UID,
    SANDBOX_USER,
    MiB,
    Mount,
    ResourceLimits,
    SandboxPolicy,
    SandboxResult,
    Termination,
)
from airlock.sandbox.seccomp import DENY_SYSCALLS, seccomp_filter

__all__ = [
    "DENY_SYSCALLS",
    "SANDBOX_UID",
    "SANDBOX_USER",
    "BwrapCommand",
    "BwrapSandbox",
    "MiB",
    "Mount",
    "ResourceLimits",
    "SandboxError",
    "SandboxPolicy",
    "SandboxResult",
    "Termination",
    "bwrap_version",
    "cgroup_parent",
    "ensure_regular",
    "find_bwrap",
    "remove_tree",
    "safe_open_beneath",
    "seccomp_filter",
]
