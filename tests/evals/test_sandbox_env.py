"""The ``airlock-bwrap`` Inspect sandbox environment: exec, files, confinement, limits, lifecycle."""

from __future__ import annotations

import json
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from inspect_ai.util import OutputLimitExceededError, SandboxEnvironment, SandboxUserUnsupportedError

from airlock.evals.sandbox import SANDBOX_NAME, BwrapSandboxConfig, BwrapSandboxEnvironment
from airlock.sandbox import ResourceLimits, remove_tree
from tests.conftest import needs_bwrap

pytestmark = needs_bwrap

CONFIG = BwrapSandboxConfig(limits=ResourceLimits(wall_timeout_s=20, output_bytes=256 * 1024))


@pytest.fixture
async def env() -> AsyncIterator[BwrapSandboxEnvironment]:
    environments = await BwrapSandboxEnvironment.sample_init("test", CONFIG, {})
    environment = environments["default"]
    assert isinstance(environment, BwrapSandboxEnvironment)
    yield environment
    await BwrapSandboxEnvironment.sample_cleanup("test", CONFIG, environments, False)
    assert not environment.root.exists()


async def test_exec_basics(env: BwrapSandboxEnvironment) -> None:
    result = await env.exec(
        ["bash", "-c", "pwd; echo $HOME $GREETING; cat; exit 4"], input="stdin!", env={"GREETING": "hi"}
    )
    assert not result.success and result.returncode == 4
    assert result.stdout.splitlines() == ["/work", "/work hi", "stdin!"]
    assert (await env.exec(["python3", "-c", "print(6 * 7)"])).stdout == "42\n"
    missing = await env.exec(["no-such-command"])
    assert not missing.success and "no-such-command" in missing.stderr


async def test_state_persists_between_execs(env: BwrapSandboxEnvironment) -> None:
    await env.exec(["bash", "-c", "mkdir -p sub && echo one > sub/a.txt && echo two > /tmp/b.txt"])
    result = await env.exec(["bash", "-c", "cat a.txt /tmp/b.txt"], cwd="sub")
    assert result.stdout == "one\ntwo\n"
    assert (await env.exec(["pwd"], cwd="/tmp")).stdout == "/tmp\n"


async def test_files_round_trip(env: BwrapSandboxEnvironment) -> None:
    await env.write_file("notes/deep/hello.txt", "héllo\r\nworld")
    await env.write_file("/work/blob.bin", bytes(range(256)))
    await env.write_file("/tmp/scratch.txt", "tmp")
    assert await env.read_file("notes/deep/hello.txt") == "héllo\r\nworld"  # newlines preserved
    assert await env.read_file("blob.bin", text=False) == bytes(range(256))
    assert (await env.exec(["cat", "notes/deep/hello.txt", "/tmp/scratch.txt"])).stdout == "héllo\r\nworldtmp"
    await env.exec(["bash", "-c", "echo made inside > made.txt"])
    assert await env.read_file("/work/made.txt") == "made inside\n"
    # Files written by the host stay editable by the sandboxed user.
    assert (await env.exec(["bash", "-c", "echo more >> notes/deep/hello.txt && rm blob.bin"])).success
    with pytest.raises(IsADirectoryError):
        await env.read_file("notes")
    with pytest.raises(FileNotFoundError):
        await env.read_file("nope.txt")


async def test_paths_outside_the_sandbox_are_refused(env: BwrapSandboxEnvironment) -> None:
    for path in (
        "../escape.txt",
        "notes/../../escape.txt",
        "/etc/passwd",
        "/usr/bin/python3",
        "/work/../etc/x",
        "/root/x",
    ):
        with pytest.raises(PermissionError):
            await env.write_file(path, "x")
        with pytest.raises(PermissionError):
            await env.read_file(path)
    assert not (env.root / "escape.txt").exists() and not (env.root.parent / "escape.txt").exists()


async def test_symlinks_planted_inside_do_not_escape(env: BwrapSandboxEnvironment) -> None:
    # A host file the sandboxed code cannot see, but whose host path it can guess.
    outside = Path(tempfile.mkdtemp(prefix="airlock-outside-"))
    secret = outside / "secret.txt"
    secret.write_text("host secret")
    try:
        plant = f"ln -s {secret} leak && ln -s {outside} dirleak && ln -s /etc etc && mkfifo pipe"
        assert (await env.exec(["bash", "-c", plant])).success
        for path in ("leak", "dirleak/secret.txt", "etc/hostname"):
            with pytest.raises(PermissionError):
                await env.read_file(path)
            with pytest.raises(PermissionError):
                await env.write_file(path, "overwritten")
        with pytest.raises(PermissionError):  # a FIFO must neither hang nor be opened
            await env.read_file("pipe")
        with pytest.raises(PermissionError):
            await env.write_file("pipe", "x")
        assert secret.read_text() == "host secret"
    finally:
        remove_tree(outside)


async def test_timeout_raises(env: BwrapSandboxEnvironment) -> None:
    with pytest.raises(TimeoutError):
        await env.exec(["sleep", "10"], timeout=1)


async def test_config_caps_longer_timeouts() -> None:
    config = BwrapSandboxConfig(limits=ResourceLimits(wall_timeout_s=0.5))
    environments = await BwrapSandboxEnvironment.sample_init("test", config, {})
    try:
        with pytest.raises(TimeoutError):
            await environments["default"].exec(["sleep", "10"], timeout=600)
    finally:
        await BwrapSandboxEnvironment.sample_cleanup("test", config, environments, True)


async def test_output_limit_raises(env: BwrapSandboxEnvironment) -> None:
    with pytest.raises(OutputLimitExceededError) as caught:
        await env.exec(["yes"])
    assert caught.value.truncated_output is not None and caught.value.truncated_output.startswith("y\ny\n")


async def test_read_file_size_limit(env: BwrapSandboxEnvironment, monkeypatch: pytest.MonkeyPatch) -> None:
    from inspect_ai.util._sandbox.limits import override_max_read_file_size

    await env.write_file("big.txt", "x" * 5000)
    with override_max_read_file_size(1000), pytest.raises(OutputLimitExceededError):
        await env.read_file("big.txt")


async def test_limits_are_reported_to_the_caller(env: BwrapSandboxEnvironment) -> None:
    config = BwrapSandboxConfig(limits=ResourceLimits(cpu_seconds=1, wall_timeout_s=20))
    environments = await BwrapSandboxEnvironment.sample_init("test", config, {})
    try:
        result = await environments["default"].exec(["python3", "-c", "while True: pass"])
        assert not result.success and "CPU time limit" in result.stderr
    finally:
        await BwrapSandboxEnvironment.sample_cleanup("test", config, environments, False)


async def test_only_the_sandbox_user(env: BwrapSandboxEnvironment) -> None:
    with pytest.raises(SandboxUserUnsupportedError):
        await env.exec(["id"], user="root")
    assert (await env.exec(["id", "-un"], user="sandbox")).stdout == "sandbox\n"


async def test_bwrap_setup_failures_are_sandbox_unavailable(env: BwrapSandboxEnvironment) -> None:
    from inspect_ai.util import SandboxUnavailableError

    with pytest.raises(SandboxUnavailableError, match="chdir"):
        await env.exec(["true"], cwd="/no/such/dir")


async def test_task_init_and_config_forms(tmp_path: Path) -> None:
    await BwrapSandboxEnvironment.task_init("test", None)
    model = BwrapSandboxEnvironment.config_deserialize({"limits": {"cpu_seconds": 5}, "mount_python": False})
    assert isinstance(model, BwrapSandboxConfig) and model.limits.cpu_seconds == 5
    path = tmp_path / "sandbox.json"
    path.write_text(json.dumps({"limits": {"wall_timeout_s": 3}}))
    environments = await BwrapSandboxEnvironment.sample_init("test", str(path), {})
    environment = environments["default"]
    assert isinstance(environment, BwrapSandboxEnvironment)
    assert environment.sandbox.policy.limits.wall_timeout_s == 3
    await BwrapSandboxEnvironment.sample_cleanup("test", str(path), environments, False)


def test_inspect_eval_uses_the_sandbox(tmp_path: Path) -> None:
    """Sample files, the sandbox registry name, tools and scorer-side exec, through Inspect itself."""
    from inspect_ai import Task, eval
    from inspect_ai.dataset import Sample
    from inspect_ai.scorer import CORRECT, INCORRECT, Score, Target, accuracy, scorer
    from inspect_ai.solver import Generate, TaskState, solver
    from inspect_ai.util import SandboxEnvironmentSpec, sandbox

    @solver
    def run_in_sandbox():  # type: ignore[no-untyped-def]
        async def solve(state: TaskState, generate: Generate) -> TaskState:
            result = await sandbox().exec(["bash", "-c", "tr a-z A-Z < in.txt > out.txt && id -un"])
            state.output.completion = result.stdout.strip()
            return state

        return solve

    @scorer(metrics=[accuracy()])
    def file_check():  # type: ignore[no-untyped-def]
        async def score(state: TaskState, target: Target) -> Score:
            content = await sandbox().read_file("out.txt")
            return Score(value=CORRECT if content.strip() == target.text else INCORRECT)

        return score

    task = Task(
        dataset=[Sample(input="x", target="HELLO", files={"in.txt": "hello"}, id="one")],
        solver=run_in_sandbox(),
        scorer=file_check(),
        sandbox=SandboxEnvironmentSpec(SANDBOX_NAME, CONFIG),
    )
    (log,) = eval(task, model="mockllm/model", log_dir=str(tmp_path / "logs"), display="none")
    assert log.status == "success", log.error
    assert log.results is not None and log.results.scores[0].metrics["accuracy"].value == 1.0
    assert log.samples is not None and log.samples[0].output.completion == "sandbox"


def test_is_registered_for_inspect() -> None:
    from inspect_ai.util._sandbox.registry import registry_find_sandboxenv

    assert registry_find_sandboxenv(SANDBOX_NAME) is BwrapSandboxEnvironment
    assert issubclass(BwrapSandboxEnvironment, SandboxEnvironment)
