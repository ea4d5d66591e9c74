"""Inspect sandbox environment ``airlock-bwrap``: each sample gets a bubblewrap jail over a private host dir.

Use it as ``sandbox=("airlock-bwrap", BwrapSandboxConfig(...))`` (or just ``"airlock-bwrap"``).
Every ``exec`` is a fresh :class:`airlock.sandbox.BwrapSandbox` run with no network, a
read-only system and rlimits; a sample's state lives in two host directories that persist
between its execs and appear inside as ``/work`` (the working directory and ``HOME``) and
``/tmp``. Processes do not outlive their ``exec`` (each runs in its own PID namespace).
``read_file``/``write_file`` reach only those two directories and never follow symlinks.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any, Literal, overload

import yaml
from inspect_ai.agent import Agent, react
from inspect_ai.tool import bash, python
from inspect_ai.util import (
    ExecResult,
    OutputLimitExceededError,
    SandboxEnvironment,
    SandboxEnvironmentConfigType,
    SandboxEnvironmentLimits,
    SandboxEnvironmentSpec,
    SandboxUnavailableError,
    SandboxUserUnsupportedError,
    sandboxenv,
)
from pydantic import BaseModel, ConfigDict, Field
from typing_extensions import override

from airlock.sandbox import (
    SANDBOX_UID,
    SANDBOX_USER,
    BwrapSandbox,
    MiB,
    ResourceLimits,
    SandboxError,
    SandboxPolicy,
    Termination,
    ensure_regular,
    remove_tree,
    safe_open_beneath,
)

__all__ = ["SANDBOX_NAME", "BwrapSandboxConfig", "BwrapSandboxEnvironment", "sandbox_agent"]

SANDBOX_NAME = "airlock-bwrap"
WORK = "/work"
TMP = "/tmp"


class BwrapSandboxConfig(BaseModel):
    """Per-task configuration of the ``airlock-bwrap`` sandbox (limits apply to every exec)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    limits: ResourceLimits = Field(
        default=ResourceLimits(wall_timeout_s=120.0),
        description="Limits per exec; wall_timeout_s also caps a caller's longer exec timeout.",
    )
    mount_python: bool = Field(default=False, description="Mount Airlock's own Python read-only (else system python3).")
    host_uid: int | Literal["auto"] | None = Field(default="auto", description="See SandboxPolicy.host_uid.")

    def policy(self) -> SandboxPolicy:
        """Return the :class:`SandboxPolicy` this configuration stands for."""
        return SandboxPolicy(
            limits=self.limits, workdir_target=WORK, mount_python=self.mount_python, host_uid=self.host_uid
        )


def _resolve_config(config: SandboxEnvironmentConfigType | None) -> BwrapSandboxConfig:
    if config is None:
        return BwrapSandboxConfig()
    if isinstance(config, BwrapSandboxConfig):
        return config
    if isinstance(config, str):
        # A path to a JSON or YAML file with the same fields (Inspect's file-based configs).
        text = Path(config).read_text()
        data = json.loads(text) if config.endswith(".json") else yaml.safe_load(text)
        return BwrapSandboxConfig.model_validate(data or {})
    return BwrapSandboxConfig.model_validate(config.model_dump())


@functools.lru_cache(maxsize=16)
def _sandbox_for(config: BwrapSandboxConfig) -> BwrapSandbox:
    return BwrapSandbox(config.policy())


@sandboxenv(name=SANDBOX_NAME)
class BwrapSandboxEnvironment(SandboxEnvironment):
    """One sample's bubblewrap sandbox: a private host root holding its ``/work`` and ``/tmp``."""

    def __init__(self, sandbox: BwrapSandbox, root: Path) -> None:
        super().__init__()
        self.sandbox = sandbox
        self.root = root
        self.work = root / "work"
        self.tmp = root / "tmp"

    # ------------------------------------------------------------------------ lifecycle

    @override
    @classmethod
    async def task_init(cls, task_name: str, config: SandboxEnvironmentConfigType | None) -> None:
        # Fail the task at start-up, with bwrap's own words, if sandboxes cannot run here.
        sandbox = _sandbox_for(_resolve_config(config))
        try:
            result = await sandbox.run(["true"], timeout=30)
        except SandboxError as exc:
            raise RuntimeError(f"the {SANDBOX_NAME} sandbox cannot run on this machine: {exc.message}") from exc
        if not result.ok:
            raise RuntimeError(f"the {SANDBOX_NAME} sandbox self-test failed: {result.stderr_text.strip()}")

    @override
    @classmethod
    async def sample_init(
        cls, task_name: str, config: SandboxEnvironmentConfigType | None, metadata: dict[str, str]
    ) -> dict[str, SandboxEnvironment]:
        sandbox = _sandbox_for(_resolve_config(config))
        root = Path(tempfile.mkdtemp(prefix="airlock-bwrap-"))
        try:
            # The root stays ours (root-owned, traverse-only for the sandbox's host uid), so
            # sandboxed code cannot swap /work or /tmp for something else on the host.
            root.chmod(0o711)
            for name in ("work", "tmp"):
                (root / name).mkdir(mode=0o755)
                sandbox.prepare_dir(root / name)
        except BaseException:
            remove_tree(root)
            raise
        return {"default": cls(sandbox, root)}

    @override
    @classmethod
    async def sample_cleanup(
        cls,
        task_name: str,
        config: SandboxEnvironmentConfigType | None,
        environments: dict[str, SandboxEnvironment],
        interrupted: bool,
    ) -> None:
        for environment in environments.values():
            if isinstance(environment, BwrapSandboxEnvironment):
                remove_tree(environment.root)

    @override
    @classmethod
    def config_deserialize(cls, config: dict[str, Any]) -> BaseModel:
        return BwrapSandboxConfig.model_validate(config)

    @override
    def default_polling_interval(self) -> float:
        return 0.2

    @override
    @classmethod
    def default_concurrency(cls) -> int | None:
        # Like Inspect's docker provider: at most two live sandboxes per core by default
        # (--max-sandboxes overrides), since each sample's commands run on this machine.
        return 2 * (os.cpu_count() or 1)

    # ------------------------------------------------------------------------ exec

    @override
    async def exec(
        self,
        cmd: list[str],
        input: str | bytes | None = None,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        user: str | None = None,
        timeout: int | None = None,
        timeout_retry: bool = True,
        concurrency: bool = True,
    ) -> ExecResult[str]:
        if user is not None and user not in (SANDBOX_USER, str(SANDBOX_UID)):
            raise SandboxUserUnsupportedError(
                f"the {SANDBOX_NAME} sandbox runs commands only as {SANDBOX_USER!r} (uid {SANDBOX_UID}), not {user!r}"
            )
        limits = self.sandbox.policy.limits
        wall = limits.wall_timeout_s if timeout is None else min(float(timeout), limits.wall_timeout_s)
        cap = min(limits.output_bytes, SandboxEnvironmentLimits.MAX_EXEC_OUTPUT_SIZE)
        try:
            result = await self.sandbox.run(
                cmd, workdir=self.work, tmpdir=self.tmp, input=input, cwd=cwd, env=env, timeout=wall, output_bytes=cap
            )
        except SandboxError as exc:
            raise SandboxUnavailableError(exc.message) from exc
        if result.termination is Termination.TIMEOUT:
            raise TimeoutError(f"Command timed out after {wall:g} seconds.")
        if result.termination is Termination.OUTPUT_LIMIT:
            raise OutputLimitExceededError(
                limit_str=SandboxEnvironmentLimits.MAX_EXEC_OUTPUT_SIZE_STR
                if cap == SandboxEnvironmentLimits.MAX_EXEC_OUTPUT_SIZE
                else f"{cap} bytes",
                truncated_output=result.stdout_text,
            )
        stderr = result.stderr_text
        notes = {
            Termination.CPU_LIMIT: f"CPU time limit of {limits.cpu_seconds} s exceeded; the process was killed.",
            Termination.FILE_SIZE_LIMIT: f"file size limit of {limits.file_size_bytes} bytes exceeded.",
        }
        if result.termination in notes:
            stderr += f"\n[{SANDBOX_NAME}] {notes[result.termination]}\n"
        return ExecResult(success=result.ok, returncode=result.exit_code, stdout=result.stdout_text, stderr=stderr)

    # ------------------------------------------------------------------------ files

    def _locate(self, file: str) -> tuple[Path, PurePosixPath]:
        """Map a sandbox path to (host mount root, path below it); refuse anything else."""
        path = PurePosixPath(file)
        if ".." in path.parts:
            raise PermissionError(errno.EACCES, "'..' is not allowed in sandbox paths", file)
        if not path.is_absolute():
            path = PurePosixPath(WORK) / path
        for mount, host in ((WORK, self.work), (TMP, self.tmp)):
            if path == PurePosixPath(mount):
                raise IsADirectoryError(errno.EISDIR, "Is a directory", file)
            if path.is_relative_to(mount):
                return host, path.relative_to(mount)
        raise PermissionError(errno.EACCES, f"only {WORK} and {TMP} are reachable in the sandbox", file)

    def _owner(self) -> tuple[int, int] | None:
        uid, gid = self.sandbox.host_uid, self.sandbox.host_gid
        return (uid, gid) if uid is not None and gid is not None else None

    @override
    async def write_file(self, file: str, contents: str | bytes) -> None:
        host_root, relative = self._locate(file)
        data = contents.encode("utf-8") if isinstance(contents, str) else contents
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        try:
            fd = safe_open_beneath(host_root, relative, flags, create_dirs=True, owner=self._owner())
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # a FIFO with no reader
                raise PermissionError(errno.EACCES, "not a regular file", file) from exc
            raise
        try:
            ensure_regular(fd, file)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)

    @overload
    async def read_file(self, file: str, text: Literal[True] = True) -> str: ...

    @overload
    async def read_file(self, file: str, text: Literal[False]) -> bytes: ...

    @override
    async def read_file(self, file: str, text: bool = True) -> str | bytes:
        host_root, relative = self._locate(file)
        fd = safe_open_beneath(host_root, relative, os.O_RDONLY)
        try:
            info = ensure_regular(fd, file)
            limit = SandboxEnvironmentLimits.MAX_READ_FILE_SIZE
            # Read at most one byte past the limit: the file may grow while we read it.
            chunks: list[bytes] = []
            size = 0
            while info.st_size <= limit and size <= limit and (chunk := os.read(fd, min(1 << 20, limit + 1 - size))):
                size += len(chunk)
                chunks.append(chunk)
        finally:
            os.close(fd)
        if info.st_size > limit or size > limit:
            raise OutputLimitExceededError(
                limit_str=SandboxEnvironmentLimits.MAX_READ_FILE_SIZE_STR, truncated_output=None
            )
        data = b"".join(chunks)
        return data.decode("utf-8") if text else data


def agentic_sandbox(*, longest_call_s: float, memory_mb: int, cpu_seconds: int) -> SandboxEnvironmentSpec:
    """Return the ``airlock-bwrap`` sandbox spec of an agentic suite: per-process memory and CPU limits.

    The wall-clock limit leaves 30 s beyond the longest single tool or check call.
    """
    limits = ResourceLimits(
        wall_timeout_s=float(longest_call_s + 30), memory_bytes=memory_mb * MiB, cpu_seconds=cpu_seconds
    )
    return SandboxEnvironmentSpec(SANDBOX_NAME, BwrapSandboxConfig(limits=limits))


def sandbox_agent(instructions: str, *, tool_timeout: int = 30) -> Agent:
    """Return the ReAct agent the sandboxed suites use: ``bash`` and ``python`` tools plus ``submit``."""
    return react(prompt=instructions, tools=[bash(timeout=tool_timeout), python(timeout=tool_timeout)])
