"""Containment corpus for the bubblewrap sandbox: each test shows one wall holding, with a clear result."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import stat
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import pytest

from airlock.sandbox import (
    DENY_SYSCALLS,
    BwrapSandbox,
    MiB,
    Mount,
    ResourceLimits,
    SandboxError,
    SandboxPolicy,
    SandboxResult,
    Termination,
    cgroup_parent,
    ensure_regular,
    find_bwrap,
    remove_tree,
    safe_open_beneath,
    seccomp_filter,
)
from airlock.sandbox.process import _Cgroup
from tests.conftest import needs_bwrap

REPO = Path(__file__).resolve().parents[1]


pytestmark = needs_bwrap


def sandbox(**limits: object) -> BwrapSandbox:
    return BwrapSandbox(SandboxPolicy(limits=ResourceLimits(**limits)))  # type: ignore[arg-type]


def py(code: str) -> list[str]:
    return ["python3", "-c", textwrap.dedent(code)]


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Not pytest's tmp_path: that lives under a 0700 directory the sandbox's host uid cannot enter.
    sb = BwrapSandbox()
    path = sb.make_workdir(prefix="airlock-test-")
    yield path
    remove_tree(path)


def _host_processes_matching(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _wait_gone(marker: str, seconds: float = 2.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while (left := _host_processes_matching(marker)) and time.monotonic() < deadline:
        time.sleep(0.02)
    return left


# ------------------------------------------------------------------------------------ basics


async def test_runs_a_command_and_reports_everything(workdir: Path) -> None:
    result = await sandbox().run(
        ["bash", "-c", "read line; echo out:$line; echo err >&2; id -un; pwd; exit 3"], workdir=workdir, input="hi\n"
    )
    assert result.termination is Termination.EXITED and result.exit_code == 3 and not result.ok
    assert result.stdout_text.splitlines() == ["out:hi", "sandbox", "/work"]
    assert result.stderr_text == "err\n"
    assert not result.truncated and result.signal is None
    assert 0 < result.wall_time_s < 5 and result.cpu_time_s >= 0 and result.max_rss_kib > 0


async def test_work_dir_is_shared_with_the_host(workdir: Path) -> None:
    (workdir / "in.txt").write_text("from host\n")
    BwrapSandbox().prepare_dir(workdir)
    result = await sandbox().run(["bash", "-c", "cat in.txt; echo from sandbox > out.txt"], workdir=workdir)
    assert result.ok and result.stdout_text == "from host\n"
    assert (workdir / "out.txt").read_text() == "from sandbox\n"


async def test_sync_convenience_and_its_guard() -> None:
    with pytest.raises(RuntimeError, match="running event loop"):
        sandbox().run_sync(["true"])


def test_sync_convenience_runs() -> None:
    result = sandbox().run_sync(["echo", "sync"])
    assert result.ok and result.stdout == b"sync\n"


# ------------------------------------------------------------------------------------ network


async def test_network_is_unreachable() -> None:
    accepted: list[object] = []
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    port = server.getsockname()[1]
    abstract = f"\0airlock-test-{secrets.token_hex(4)}"
    unix_server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix_server.bind(abstract)
    unix_server.listen()
    stop = threading.Event()

    def accept_loop() -> None:
        while not stop.is_set():
            try:
                accepted.append(server.accept())
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept_loop, daemon=True)
    thread.start()
    probe = f"""
        import socket
        def attempt(family, address):
            s = socket.socket(family, socket.SOCK_STREAM)
            s.settimeout(2)
            try:
                s.connect(address)
                return "CONNECTED"
            except OSError as exc:
                return type(exc).__name__
            finally:
                s.close()
        # The host's loopback server: the sandbox's 127.0.0.1 is its own, empty loopback.
        print("host-loopback", attempt(socket.AF_INET, ("127.0.0.1", {port})))
        # TEST-NET-1 (RFC 5737, never routed): no interface, so no packet can even leave.
        print("external", attempt(socket.AF_INET, ("192.0.2.1", 80)))
        # Abstract unix sockets are per network namespace.
        print("abstract-unix", attempt(socket.AF_UNIX, {abstract!r}))
        try:
            socket.getaddrinfo("example.com", 443)
            print("dns", "RESOLVED")
        except OSError as exc:
            print("dns", type(exc).__name__)
        print("interfaces", sorted(l.split(":")[0].strip() for l in open("/proc/net/dev").readlines()[2:]))
    """
    try:
        result = await sandbox().run(py(probe), timeout=20)
    finally:
        stop.set()
        thread.join()
        server.close()
        unix_server.close()
    lines = dict(line.split(" ", 1) for line in result.stdout_text.splitlines())
    assert result.ok, result.stderr_text
    assert lines["host-loopback"] == "ConnectionRefusedError"
    assert lines["external"] in ("OSError", "TimeoutError")  # ENETUNREACH: no route at all
    assert lines["abstract-unix"] == "ConnectionRefusedError"
    assert lines["dns"] != "RESOLVED"
    assert lines["interfaces"] == "['lo']"
    assert accepted == []  # the host server never saw a connection
    assert result.wall_time_s < 5  # failures are immediate, not timeouts


# ------------------------------------------------------------------------------------ filesystem


async def test_host_filesystem_is_not_visible(workdir: Path, airlock_env: Path) -> None:
    # A world-readable secret outside the sandbox, and one in Airlock's data dir.
    secret_dir = Path(tempfile.mkdtemp(prefix="airlock-secret-"))
    secret_dir.chmod(0o755)
    secret = secret_dir / "secret.txt"
    secret.write_text("TOP-SECRET-HOST-FILE")
    secret.chmod(0o644)
    airlock_env.mkdir(parents=True, exist_ok=True)
    (airlock_env / "airlock.db").write_text("TOP-SECRET-DATA-DIR")
    paths = [str(secret), str(airlock_env / "airlock.db"), str(REPO / "pyproject.toml"), str(Path.home()), "/root",
             "/etc/shadow", "/etc/hostname", "/home", "/var", "/run", "/opt", "/srv", "/mnt", "/sys"]  # fmt: skip
    probe = f"""
        import os
        for p in {paths!r}:
            try:
                if os.path.isdir(p):
                    print(p, "LISTED", os.listdir(p))
                else:
                    print(p, "READ", open(p).read()[:40])
            except OSError as exc:
                print(p, "DENIED", type(exc).__name__)
        print("ROOT", sorted(os.listdir("/")))
        pids = [n for n in os.listdir("/proc") if n.isdigit()]
        argv0 = [open(f"/proc/{{n}}/cmdline", "rb").read().split(b"\\0")[0] for n in pids]
        names = sorted(os.path.basename(a).decode() for a in argv0)
        print("PIDS", ",".join(names))
    """
    try:
        result = await sandbox().run(py(probe), workdir=workdir)
    finally:
        remove_tree(secret_dir)
    assert result.ok, result.stderr_text
    assert "TOP-SECRET" not in result.stdout_text
    for line in result.stdout_text.splitlines():
        if line.startswith("/"):
            assert line.split()[1] == "DENIED", line  # does not exist in the sandbox at all
    root_line = next(line for line in result.stdout_text.splitlines() if line.startswith("ROOT"))
    assert set(eval(root_line[5:])) <= {
        "bin",
        "dev",
        "etc",
        "lib",
        "lib32",
        "lib64",
        "libx32",
        "proc",
        "sbin",
        "tmp",
        "usr",
        "work",
    }
    pids_line = next(line for line in result.stdout_text.splitlines() if line.startswith("PIDS")).split()
    assert set(pids_line[1].split(",")) <= {"bash", "python3"}  # only the sandbox's own init and the probe


async def test_etc_is_synthetic() -> None:
    result = await sandbox().run(["bash", "-c", "cat /etc/passwd; ls /etc"])
    assert result.ok
    assert "root:x:0:0:root:/nonexistent" in result.stdout_text and "sandbox:x:1000" in result.stdout_text
    host_users = {line.split(":")[0] for line in Path("/etc/passwd").read_text().splitlines()} - {"root", "nobody"}
    assert not any(f"\n{user}:" in result.stdout_text for user in host_users)
    assert "shadow" not in result.stdout_text and "ssl" not in result.stdout_text.split()


async def test_system_is_read_only(workdir: Path) -> None:
    targets = ["/usr/evil", "/usr/bin/evil", "/etc/evil", "/evil", "/dev/evil", "/bin/evil", "/proc/evil"]
    probe = f"""
        for p in {targets!r} + ["/work/ok", "/tmp/ok", "/dev/shm/ok"]:
            try:
                open(p, "w").write("x")
                print(p, "WROTE")
            except OSError as exc:
                print(p, "REFUSED", exc.strerror)
    """
    result = await sandbox().run(py(probe), workdir=workdir)
    outcome = {line.split()[0]: line.split()[1] for line in result.stdout_text.splitlines()}
    assert all(outcome[p] == "REFUSED" for p in targets), result.stdout_text
    assert outcome["/work/ok"] == outcome["/tmp/ok"] == outcome["/dev/shm/ok"] == "WROTE"
    assert not Path("/usr/evil").exists() and not Path("/evil").exists()


async def test_no_privileges_and_no_leaked_descriptors() -> None:
    script = "grep CapEff /proc/self/status; id -u; unshare --user true && echo NESTED-USERNS; ls /proc/self/fd"
    result = await sandbox().run(["bash", "-c", script])
    lines = result.stdout_text.split()
    assert "CapEff:" in lines and lines[lines.index("CapEff:") + 1] == "0000000000000000"
    assert "1000" in lines and "NESTED-USERNS" not in result.stdout_text
    assert sorted(lines[lines.index("1000") + 1 :]) == ["0", "1", "2", "3"]  # 3 is ls reading the dir


async def test_environment_is_cleared(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRLOCK_API_KEY", "sk-host-secret-canary")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "host-secret-canary")
    result = await sandbox().run(["env"], env={"EXTRA": "given"})
    names = {line.split("=", 1)[0] for line in result.stdout_text.splitlines()}
    assert "canary" not in result.stdout_text
    assert names <= {"PATH", "HOME", "LANG", "USER", "LOGNAME", "TMPDIR", "EXTRA", "PWD", "SHLVL", "_"}
    assert "EXTRA=given" in result.stdout_text and "HOME=/work" in result.stdout_text
    with pytest.raises(ValueError, match="invalid environment"):
        await sandbox().run(["env"], env={"BAD=NAME": "x"})


# ------------------------------------------------------------------------------------ limits


async def test_memory_limit() -> None:
    result = await sandbox(memory_bytes=256 * MiB).run(py("b = bytearray(1024 ** 3)\nprint('ALLOCATED')"))
    assert "ALLOCATED" not in result.stdout_text
    assert result.exit_code != 0 and "MemoryError" in result.stderr_text


async def test_cpu_time_limit() -> None:
    result = await sandbox(cpu_seconds=1, wall_timeout_s=20).run(py("while True: pass"))
    assert result.termination is Termination.CPU_LIMIT, result
    assert 0.8 < result.cpu_time_s < 4 and result.wall_time_s < 6


async def test_cpu_time_counts_every_process_even_when_killed() -> None:
    # An orphan that spins while the command sleeps, killed when the command ends...
    orphan = await sandbox().run(["bash", "-c", "(python3 -c 'while True: pass' &); sleep 1"])
    assert orphan.ok and orphan.cpu_time_s > 0.3, orphan
    # ...and a spinning command killed by the wall-clock timeout: both still accounted.
    spinner = await sandbox().run(py("while True: pass"), timeout=1)
    assert spinner.timed_out and spinner.cpu_time_s > 0.3, spinner


_ACCOUNTINGS = [
    pytest.param(
        "cgroup", marks=pytest.mark.skipif(cgroup_parent() is None, reason="no writable cgroup v2 on this machine")
    ),
    "proc",
]
_SPINNERS = """
    import os
    for _ in range(6):
        if os.fork() == 0:
            while True:
                pass
    os.wait()
"""


@pytest.mark.parametrize("accounting", _ACCOUNTINGS)
async def test_cpu_limit_covers_the_whole_process_tree(accounting: str) -> None:
    # Six spinners each stay far below a per-process limit; together they reach the sandbox's.
    policy = SandboxPolicy(limits=ResourceLimits(cpu_seconds=2, wall_timeout_s=60), cpu_accounting=accounting)  # type: ignore[arg-type]
    result = await BwrapSandbox(policy).run(py(_SPINNERS))
    assert result.termination is Termination.CPU_LIMIT and result.cpu_accounting == accounting, result
    # Killed at the limit, not at 6x it (/proc counts whole ticks per process, so it errs early by a few).
    assert 1.9 <= result.cpu_time_s <= 2.5
    assert result.exit_code == 137 and result.wall_time_s < 30
    parent = cgroup_parent()
    if parent is not None:  # the run's own cgroup is gone with it
        assert not list(parent.glob(f"airlock-sbx-{os.getpid()}-*"))


@pytest.mark.parametrize("accounting", _ACCOUNTINGS)
async def test_cpu_of_children_that_already_exited_counts(accounting: str) -> None:
    # Each child spins 0.3 s and exits, reaped by a parent that uses no CPU: no process ever
    # nears the limit, the tree passes it after a few children.
    serial = """
        import os, time
        for n in range(40):
            if os.fork() == 0:
                start = time.process_time()
                while time.process_time() - start < 0.3:
                    pass
                os._exit(0)
            os.wait()
            print(n, flush=True)
    """
    policy = SandboxPolicy(limits=ResourceLimits(cpu_seconds=1, wall_timeout_s=60), cpu_accounting=accounting)  # type: ignore[arg-type]
    result = await BwrapSandbox(policy).run(py(serial))
    assert result.termination is Termination.CPU_LIMIT, result
    assert len(result.stdout_text.split()) <= 4 and 0.9 <= result.cpu_time_s <= 1.5


async def test_cgroup_accounting_is_refused_where_no_cgroup_can_be_made(tmp_path: Path) -> None:
    policy = SandboxPolicy(cpu_accounting="cgroup", cgroup_parent=tmp_path)
    with pytest.raises(SandboxError, match="no writable cgroup v2"):
        await BwrapSandbox(policy).run(["true"])
    assert (await BwrapSandbox(SandboxPolicy(cgroup_parent=tmp_path)).run(["true"])).cpu_accounting == "proc"


def test_cgroup_counters_are_read(tmp_path: Path) -> None:
    group = _Cgroup(tmp_path)
    (tmp_path / "cpu.stat").write_text("usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\n")
    assert group.cpu_seconds() == 2.5 and group.oom_kills() == 0  # no memory controller: no events file
    (tmp_path / "memory.events").write_text("low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\n")
    assert group.oom_kills() == 1


async def test_wall_clock_timeout_kills_the_whole_sandbox() -> None:
    marker = f"{secrets.randbelow(10**6) + 10**6}"
    started = time.monotonic()
    result = await sandbox().run(["bash", "-c", f"sleep 3{marker} & sleep 4{marker}; echo never"], timeout=0.5)
    assert result.termination is Termination.TIMEOUT and result.timed_out and not result.ok
    assert result.exit_code == 137 and "never" not in result.stdout_text
    assert time.monotonic() - started < 3
    assert _wait_gone(marker) == []  # the background sleep died with the sandbox too


async def test_cancelling_a_run_kills_the_sandbox() -> None:
    marker = f"{secrets.randbelow(10**6) + 10**6}"
    run = asyncio.ensure_future(sandbox().run(["sleep", f"5{marker}"], timeout=60))
    await asyncio.sleep(0.3)
    assert _host_processes_matching(marker)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert _wait_gone(marker) == []


async def test_fork_bomb_is_bounded_by_the_process_limit() -> None:
    if BwrapSandbox().host_uid is None and os.geteuid() == 0:
        pytest.skip("root without a host uid switch: the kernel does not apply RLIMIT_NPROC to root")
    bomb = """
        import os, time
        forked, error = 0, None
        for _ in range(200):
            try:
                if os.fork() == 0:
                    time.sleep(5)
                    os._exit(0)
                forked += 1
            except OSError as exc:
                error = exc.strerror
                break
        print(forked, error)
    """
    result = await sandbox(max_processes=32, wall_timeout_s=20).run(py(bomb))
    forked, _, error = result.stdout_text.strip().partition(" ")
    assert result.ok, result.stderr_text
    assert 0 < int(forked) < 32 and "Resource temporarily unavailable" in error
    assert result.wall_time_s < 4  # the children did not outlive the sandbox's main process
    uid = BwrapSandbox().host_uid
    if uid is not None:  # nothing of the sandbox is left running on the host
        deadline = time.monotonic() + 2
        while (left := [p for p in Path("/proc").iterdir() if p.name.isdigit() and _uid_of(p) == uid]) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.02)
        assert left == []


def _uid_of(proc: Path) -> int | None:
    try:
        for line in (proc / "status").read_text().splitlines():
            if line.startswith("Uid:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


async def test_file_size_limit(workdir: Path) -> None:
    result = await sandbox(file_size_bytes=1 * MiB).run(
        ["bash", "-c", "head -c 5000000 /dev/zero > big"], workdir=workdir
    )
    assert result.termination is Termination.FILE_SIZE_LIMIT, result
    assert (workdir / "big").stat().st_size <= 1 * MiB


async def test_tmp_is_size_capped() -> None:
    result = await sandbox(tmp_bytes=4 * MiB).run(["bash", "-c", "head -c 10000000 /dev/zero > /tmp/fill"])
    assert result.exit_code != 0 and "No space left on device" in result.stderr_text


async def test_open_files_limit() -> None:
    probe = """
        files = []
        try:
            for _ in range(100):
                files.append(open("/dev/null"))
        except OSError as exc:
            print(len(files), exc.strerror)
    """
    result = await sandbox(open_files=32).run(py(probe))
    opened, _, error = result.stdout_text.strip().partition(" ")
    assert int(opened) < 32 and error == "Too many open files"


async def test_output_is_capped() -> None:
    result = await sandbox(output_bytes=64 * 1024).run(["bash", "-c", "echo small >&2; yes"])
    assert result.termination is Termination.OUTPUT_LIMIT
    assert len(result.stdout) == 64 * 1024 and result.stdout_truncated and result.truncated
    assert result.stderr == b"small\n" and not result.stderr_truncated
    assert result.wall_time_s < 3  # killed at the cap, not at the timeout


async def test_signal_deaths_are_reported() -> None:
    result = await sandbox().run(["bash", "-c", "kill -SEGV $$"])
    assert result.termination is Termination.SIGNALED and result.signal == 11


# ------------------------------------------------------------------------------------ policy


def test_bwrap_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIRLOCK_BWRAP", raising=False)
    assert os.access(find_bwrap(), os.X_OK)
    monkeypatch.setenv("AIRLOCK_BWRAP", "/nonexistent/bwrap")
    with pytest.raises(SandboxError, match="AIRLOCK_BWRAP"):
        find_bwrap()


async def test_setup_failure_is_a_sandbox_error() -> None:
    policy = SandboxPolicy(mounts=(Mount(source=Path("/nonexistent-airlock-path"), target="/data"),))
    with pytest.raises(SandboxError, match="set up the sandbox"):
        await BwrapSandbox(policy).run(["true"])


async def test_mounts_that_expose_protected_paths_are_refused(airlock_env: Path) -> None:
    airlock_env.mkdir(parents=True, exist_ok=True)
    for source in (airlock_env.parent, airlock_env, Path("/")):
        policy = SandboxPolicy(mounts=(Mount(source=source, target="/data"),))
        with pytest.raises(SandboxError, match="refusing to mount"):
            await BwrapSandbox(policy).run(["true"])
    with pytest.raises(ValueError, match="absolute"):
        Mount(source=Path("/usr"), target="relative")


async def test_unreachable_mount_sources_are_explained() -> None:
    if BwrapSandbox().host_uid is None:
        pytest.skip("only a root-run Airlock drops to another host uid")
    private = Path(tempfile.mkdtemp(prefix="airlock-private-"))  # mode 0700, owned by root
    (private / "data").mkdir()
    try:
        policy = SandboxPolicy(mounts=(Mount(source=private / "data", target="/data"),))
        with pytest.raises(SandboxError, match="not accessible to the sandbox's host uid"):
            await BwrapSandbox(policy).run(["true"])
    finally:
        remove_tree(private)


async def test_read_only_extra_mount() -> None:
    policy = SandboxPolicy(mounts=(Mount(source=Path("/usr/share"), target="/data"),))
    result = await BwrapSandbox(policy).run(["bash", "-c", "ls /data > /dev/null && touch /data/x"])
    assert result.exit_code != 0 and "Read-only file system" in result.stderr_text


async def test_mount_python_gives_this_interpreter() -> None:
    # Root's interpreter may live under /root (mode 0700), which the dropped host uid cannot
    # enter; keep the caller's uid for this one.
    policy = SandboxPolicy(mount_python=True, host_uid=None)
    result = await BwrapSandbox(policy).run(py("import sys, pydantic; print(sys.prefix)"))
    import sys

    assert result.ok, result.stderr_text
    assert result.stdout_text.strip() == sys.prefix


# ------------------------------------------------------------------------------------ host-side file access


def test_safe_open_beneath_refuses_escapes(workdir: Path) -> None:
    outside = Path(tempfile.mkdtemp(prefix="airlock-outside-"))
    (outside / "secret").write_text("host secret")
    (workdir / "sub").mkdir()
    (workdir / "sub" / "ok.txt").write_text("fine")
    (workdir / "link").symlink_to(outside / "secret")
    (workdir / "dirlink").symlink_to(outside)
    os.mkfifo(workdir / "fifo")
    try:
        fd = safe_open_beneath(workdir, PurePosixPath("sub/ok.txt"), os.O_RDONLY)
        assert os.read(fd, 10) == b"fine"
        os.close(fd)
        for bad in ("link", "dirlink/secret", "../" + outside.name + "/secret", "sub/../../x"):
            with pytest.raises(PermissionError):
                os.close(safe_open_beneath(workdir, PurePosixPath(bad), os.O_RDONLY))
        with pytest.raises(PermissionError):
            os.close(safe_open_beneath(workdir, PurePosixPath("link"), os.O_WRONLY | os.O_TRUNC))
        assert (outside / "secret").read_text() == "host secret"
        fd = safe_open_beneath(workdir, PurePosixPath("fifo"), os.O_RDONLY)  # must not block
        with pytest.raises(PermissionError, match="regular"):
            ensure_regular(fd, "fifo")
        os.close(fd)
        fd = safe_open_beneath(workdir, PurePosixPath("new/deep/file"), os.O_WRONLY | os.O_CREAT, create_dirs=True)
        assert stat.S_ISREG(os.fstat(fd).st_mode)
        os.close(fd)
    finally:
        remove_tree(outside)


def test_result_helpers() -> None:
    result = SandboxResult(
        exit_code=0,
        stdout=b"\xffok",
        stderr=b"",
        stdout_truncated=False,
        stderr_truncated=False,
        wall_time_s=0.1,
        cpu_time_s=0.0,
        max_rss_kib=1,
        termination=Termination.EXITED,
    )
    assert result.ok and result.stdout_text == "\ufffdok" and result.signal is None


# ------------------------------------------------------------------------------------ seccomp

_PTRACE_AND_MOUNT = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
calls = (("traceme", libc.ptrace(0, 0, None, None)), ("mount", libc.mount(b"n", b"/tmp", b"tmpfs", 0, None)))
for name, result in calls:
    print(name, "ok" if result == 0 else os.strerror(ctypes.get_errno()))
"""


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


def test_seccomp_filter_shape_and_unknown_names() -> None:
    program = seccomp_filter(["ptrace", "mount"], machine="x86_64")
    # arch load + check, nr load, x32 check, two comparisons, allow, errno, kill: 9 instructions of 8 bytes.
    assert len(program) == 9 * 8
    assert len(seccomp_filter(["ptrace"], machine="aarch64")) == 7 * 8  # no foreign-ABI check
    with pytest.raises(SandboxError, match="no seccomp syscall table"):
        seccomp_filter(["ptrace"], machine="sparc64")
    with pytest.raises(ValueError, match="unknown system calls"):
        SandboxPolicy(deny_syscalls=("ptrace", "frobnicate"))
