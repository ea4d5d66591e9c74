"""The seccomp deny-list: denied calls fail with EPERM in the sandbox, and the program decides each call as meant."""

from __future__ import annotations

import errno
import re
import struct
from pathlib import Path

import pytest

from airlock.sandbox import DENY_SYSCALLS, BwrapSandbox, SandboxError, SandboxPolicy, seccomp_filter
from tests.conftest import needs_bwrap
from tests.sandbox.conftest import py, sandbox

_PTRACE_AND_MOUNT = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
calls = (("traceme", libc.ptrace(0, 0, None, None)), ("mount", libc.mount(b"n", b"/tmp", b"tmpfs", 0, None)))
for name, result in calls:
    print(name, "ok" if result == 0 else os.strerror(ctypes.get_errno()))
"""


@needs_bwrap
async def test_denied_syscalls_fail_with_eperm() -> None:
    # Without the filter a process may ptrace (here: itself); with it, the call is refused.
    plain = await sandbox().run(py(_PTRACE_AND_MOUNT))
    assert plain.ok, plain.stderr_text
    assert "traceme ok" in plain.stdout_text
    hardened = BwrapSandbox(SandboxPolicy(deny_syscalls=DENY_SYSCALLS))
    result = await hardened.run(py(_PTRACE_AND_MOUNT))
    assert result.ok, result.stderr_text
    assert result.stdout_text.split("\n")[:2] == ["traceme Operation not permitted", "mount Operation not permitted"]
    ordinary = await hardened.run(["bash", "-c", "echo hi | cat && ls / > /dev/null"])
    assert ordinary.ok and ordinary.stdout_text == "hi\n"


@needs_bwrap
def test_seccomp_filter_shape_and_unknown_names() -> None:
    program = seccomp_filter(["ptrace", "mount"], machine="x86_64")
    # arch load + check, nr load, x32 check, two comparisons, allow, errno, kill: 9 instructions of 8 bytes.
    assert len(program) == 9 * 8
    assert len(seccomp_filter(["ptrace"], machine="aarch64")) == 7 * 8  # no foreign-ABI check
    with pytest.raises(SandboxError, match="no seccomp syscall table"):
        seccomp_filter(["ptrace"], machine="sparc64")
    with pytest.raises(ValueError, match="unknown system calls"):
        SandboxPolicy(deny_syscalls=("ptrace", "frobnicate"))


# Values from the kernel's UAPI headers (linux/audit.h, linux/seccomp.h), written out here so
# the test does not read them from the code under test.
_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_RET_ALLOW, _RET_ERRNO, _RET_KILL_PROCESS = 0x7FFF0000, 0x00050000, 0x80000000
_UNISTD = {
    "x86_64": Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h"),
    "aarch64": Path("/usr/include/asm-generic/unistd.h"),  # the table aarch64 uses
}


def _kernel_syscalls(machine: str) -> dict[str, int]:
    header = _UNISTD[machine]
    if not header.is_file():
        pytest.skip(f"no kernel headers at {header} (install linux-libc-dev)")
    found = re.findall(r"^#define __NR_(\w+)\s+(\d+)\s*$", header.read_text(), flags=re.MULTILINE)
    return {name: int(number) for name, number in found if name != "syscalls"}


def _decide(program: bytes, arch: int, nr: int) -> int:
    """Run a classic-BPF seccomp program on one call (only the instructions a deny-list needs)."""
    insns: list[tuple[int, int, int, int]] = list(struct.iter_unpack("=HBBI", program))
    fields = {0: nr, 4: arch}  # offsets of seccomp_data.nr and seccomp_data.arch
    acc = pc = 0
    for _ in insns:  # jumps only go forward, so no program runs more steps than it has
        code, jt, jf, k = insns[pc]
        pc += 1
        if code == 0x20:  # BPF_LD | BPF_W | BPF_ABS
            acc = fields[k]
        elif code == 0x15:  # BPF_JMP | BPF_JEQ | BPF_K
            pc += jt if acc == k else jf
        elif code == 0x35:  # BPF_JMP | BPF_JGE | BPF_K
            pc += jt if acc >= k else jf
        elif code == 0x06:  # BPF_RET | BPF_K
            return k
        else:
            raise AssertionError(f"unexpected BPF instruction {code:#x}")
    raise AssertionError("the program fell off its end")


@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
def test_filter_denies_exactly_the_listed_calls_by_the_kernels_numbers(machine: str) -> None:
    kernel = _kernel_syscalls(machine)
    assert set(DENY_SYSCALLS) <= set(kernel), set(DENY_SYSCALLS) - set(kernel)
    program = seccomp_filter(DENY_SYSCALLS, machine=machine)
    arch = _AUDIT_ARCH[machine]
    denied = {kernel[name] for name in DENY_SYSCALLS}
    for name in DENY_SYSCALLS:
        assert _decide(program, arch, kernel[name]) == _RET_ERRNO | errno.EPERM, name
    for name, number in kernel.items():
        if number not in denied:
            assert _decide(program, arch, number) == _RET_ALLOW, name
    other = next(value for key, value in _AUDIT_ARCH.items() if key != machine)
    assert _decide(program, other, kernel["read"]) == _RET_KILL_PROCESS  # another ABI's numbers mean other calls
    if machine == "x86_64":  # x32 calls share the arch and are refused whatever their number
        assert _decide(program, arch, 0x40000000 | kernel["read"]) == _RET_ERRNO | errno.EPERM
