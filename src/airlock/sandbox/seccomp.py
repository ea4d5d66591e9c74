"""An opt-in seccomp deny-list: the system calls untrusted code has no use for, and the BPF program refusing them.

Syscall numbers differ per architecture: the tables carry every call of :data:`DENY_SYSCALLS`
for x86_64 and aarch64 (a machine without a table can deny none), and the program checks the
architecture before it reads a number. bwrap installs the program just before the sandbox's init
runs, so it binds every process of the sandbox (see :func:`airlock.sandbox.argv.build_command`).
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Sequence

from airlock.sandbox.errors import SandboxError

__all__ = ["DENY_SYSCALLS", "SYSCALLS_X86_64", "seccomp_filter"]

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
SYSCALLS_X86_64 = {
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
    "x86_64": (0xC000003E, SYSCALLS_X86_64, 0x40000000),
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
