"""The containment the bwrap command line builds: each test shows one wall holding, with a clear result."""

from __future__ import annotations

import os
import secrets
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from airlock.sandbox import (
    BwrapCommand,
    BwrapSandbox,
    MiB,
    Mount,
    ResourceLimits,
    SandboxError,
    SandboxPolicy,
    Termination,
    remove_tree,
    seccomp_filter,
)
from airlock.sandbox.argv import build_command
from tests.conftest import needs_bwrap
from tests.sandbox.conftest import py, sandbox

REPO = Path(__file__).resolve().parents[2]


@needs_bwrap
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


@needs_bwrap
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


@needs_bwrap
async def test_etc_is_synthetic() -> None:
    result = await sandbox().run(["bash", "-c", "cat /etc/passwd; ls /etc"])
    assert result.ok
    assert "root:x:0:0:root:/nonexistent" in result.stdout_text and "sandbox:x:1000" in result.stdout_text
    host_users = {line.split(":")[0] for line in Path("/etc/passwd").read_text().splitlines()} - {"root", "nobody"}
    assert not any(f"\n{user}:" in result.stdout_text for user in host_users)
    assert "shadow" not in result.stdout_text and "ssl" not in result.stdout_text.split()


@needs_bwrap
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


@needs_bwrap
async def test_no_privileges_and_no_leaked_descriptors() -> None:
    script = "grep CapEff /proc/self/status; id -u; unshare --user true && echo NESTED-USERNS; ls /proc/self/fd"
    result = await sandbox().run(["bash", "-c", script])
    lines = result.stdout_text.split()
    assert "CapEff:" in lines and lines[lines.index("CapEff:") + 1] == "0000000000000000"
    assert "1000" in lines and "NESTED-USERNS" not in result.stdout_text
    assert sorted(lines[lines.index("1000") + 1 :]) == ["0", "1", "2", "3"]  # 3 is ls reading the dir


@needs_bwrap
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


@needs_bwrap
async def test_memory_limit() -> None:
    result = await sandbox(memory_bytes=256 * MiB).run(py("b = bytearray(1024 ** 3)\nprint('ALLOCATED')"))
    assert "ALLOCATED" not in result.stdout_text
    assert result.exit_code != 0 and "MemoryError" in result.stderr_text


@needs_bwrap
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


@needs_bwrap
async def test_file_size_limit(workdir: Path) -> None:
    result = await sandbox(file_size_bytes=1 * MiB).run(
        ["bash", "-c", "head -c 5000000 /dev/zero > big"], workdir=workdir
    )
    assert result.termination is Termination.FILE_SIZE_LIMIT, result
    assert (workdir / "big").stat().st_size <= 1 * MiB


@needs_bwrap
async def test_tmp_is_size_capped() -> None:
    result = await sandbox(tmp_bytes=4 * MiB).run(["bash", "-c", "head -c 10000000 /dev/zero > /tmp/fill"])
    assert result.exit_code != 0 and "No space left on device" in result.stderr_text


@needs_bwrap
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


@needs_bwrap
async def test_mounts_that_expose_protected_paths_are_refused(airlock_env: Path) -> None:
    airlock_env.mkdir(parents=True, exist_ok=True)
    for source in (airlock_env.parent, airlock_env, Path("/")):
        policy = SandboxPolicy(mounts=(Mount(source=source, target="/data"),))
        with pytest.raises(SandboxError, match="refusing to mount"):
            await BwrapSandbox(policy).run(["true"])
    with pytest.raises(ValueError, match="absolute"):
        Mount(source=Path("/usr"), target="relative")


@needs_bwrap
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


@needs_bwrap
async def test_read_only_extra_mount() -> None:
    policy = SandboxPolicy(mounts=(Mount(source=Path("/usr/share"), target="/data"),))
    result = await BwrapSandbox(policy).run(["bash", "-c", "ls /data > /dev/null && touch /data/x"])
    assert result.exit_code != 0 and "Read-only file system" in result.stderr_text


@needs_bwrap
async def test_mount_python_gives_this_interpreter() -> None:
    # Root's interpreter may live under /root (mode 0700), which the dropped host uid cannot
    # enter; keep the caller's uid for this one.
    policy = SandboxPolicy(mount_python=True, host_uid=None)
    result = await BwrapSandbox(policy).run(py("import sys, pydantic; print(sys.prefix)"))

    assert result.ok, result.stderr_text
    assert result.stdout_text.strip() == sys.prefix


# ------------------------------------------------------------------------------------ the command line itself


def _build(policy: SandboxPolicy | None = None, **options: Any) -> BwrapCommand:
    return build_command(
        ["python3", "job.py"],
        policy or SandboxPolicy(),
        bwrap="/opt/bwrap",
        prlimit="/usr/bin/prlimit",
        init_shell="/usr/bin/bash",
        host_uid=None,
        **options,
    )


def test_the_command_runs_last_under_the_init_and_its_rlimits() -> None:
    limits = ResourceLimits(
        cpu_seconds=5, memory_bytes=256 * MiB, max_processes=None, file_size_bytes=MiB, open_files=None
    )
    argv = _build(SandboxPolicy(limits=limits)).argv
    assert argv[0] == "/opt/bwrap"
    init = argv.index("--as-pid-1")
    assert argv[init + 1 : init + 5] == ["--", "/usr/bin/bash", "-p", "-c"] and argv[init + 6] == "airlock-init"
    # Soft CPU limit one second under the hard one (SIGXCPU first), no core dumps, unset limits left out.
    assert argv[init + 7 :] == [
        "/usr/bin/prlimit", "--core=0", "--cpu=5:6", f"--as={256 * MiB}", f"--fsize={MiB}", "--", "python3", "job.py",
    ]  # fmt: skip
    # Every containment option comes before the init: bwrap reads nothing after "--".
    for flag in ("--unshare-all", "--disable-userns", "--die-with-parent", "--new-session", "--clearenv"):
        assert argv.index(flag) < init
    assert argv[argv.index("--cap-drop") + 1] == "ALL"


def test_only_allowed_and_given_variables_reach_the_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRLOCK_API_KEY", "sk-host-secret")
    argv = _build(env={"SEED": "7"}).argv
    set_at = [index for index, arg in enumerate(argv) if arg == "--setenv"]
    assert argv.index("--clearenv") < min(set_at)  # bwrap applies options in order
    given = {argv[index + 1]: argv[index + 2] for index in set_at}
    assert set(given) == {"PATH", "HOME", "LANG", "USER", "LOGNAME", "TMPDIR", "SEED"}
    assert given["SEED"] == "7" and given["HOME"] == "/work" and "sk-host-secret" not in argv
    with pytest.raises(ValueError, match="invalid environment variable"):
        _build(env={"LD_PRELOAD=x": "y"})


def test_synthetic_files_and_the_seccomp_program_travel_by_placeholder() -> None:
    plain = _build(SandboxPolicy(workdir_target="/job"), cwd="sub")
    assert set(plain.data_files) == {"/etc/passwd", "/etc/group", "/etc/hosts"} and "--seccomp" not in plain.argv
    for target in plain.data_files:
        at = plain.argv.index("{fd:" + target + "}")
        assert plain.argv[at - 1 : at + 2] == ["--ro-bind-data", "{fd:" + target + "}", target]
    assert "sandbox:x:1000:1000:sandbox:/job:/bin/bash\n" in plain.data_files["/etc/passwd"].decode()
    assert plain.argv[plain.argv.index("--chdir") + 1] == "/job/sub"
    hardened = _build(SandboxPolicy(deny_syscalls=("ptrace", "bpf")))
    at = hardened.argv.index("--seccomp")
    assert hardened.argv[at + 1] == "{fd:seccomp}" and at < hardened.argv.index("--as-pid-1")
    assert hardened.data_files["seccomp"] == seccomp_filter(["ptrace", "bpf"])


def test_mounts_keep_their_mode_and_never_expose_the_data_dir(airlock_env: Path) -> None:
    mounts = (
        Mount(source=Path("/usr/share"), target="/data"),
        Mount(source=Path("/var/tmp"), target="/out", writable=True),
    )
    argv = _build(SandboxPolicy(mounts=mounts)).argv
    data, out = argv.index("/data"), argv.index("/out")
    assert argv[data - 2 : data + 1] == ["--ro-bind", str(Path("/usr/share").resolve()), "/data"]
    assert argv[out - 2 : out + 1] == ["--bind", str(Path("/var/tmp").resolve()), "/out"]
    # Everything mounted before the seal, which makes the root and /dev read-only.
    assert out < argv.index("--remount-ro")
    airlock_env.mkdir(parents=True, exist_ok=True)
    with pytest.raises(SandboxError, match="refusing to mount"):
        _build(SandboxPolicy(mounts=(Mount(source=airlock_env.parent, target="/data"),)))
