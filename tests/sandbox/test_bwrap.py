"""BwrapSandbox, the entry point: a command runs and reports everything, shares its work dir, runs from sync code."""

from __future__ import annotations

from pathlib import Path

import pytest

from airlock.sandbox import BwrapSandbox, Termination
from tests.conftest import needs_bwrap
from tests.sandbox.conftest import sandbox

pytestmark = needs_bwrap


async def test_runs_a_command_and_reports_everything(workdir: Path) -> None:
    result = await sandbox().run(
        ["bash", "-c", "read line; echo out:$line; echo err >&2; id -un; pwd; exit 3"], workdir=workdir, input="hi\n"
    )
    assert result.termination is Termination.EXITED and result.exit_code == 3 and not result.ok
    assert result.stdout_text.splitlines() == ["out:hi", "sandbox", "/work"]
    assert result.stderr_text == "err\n"
    assert not result.truncated and result.signal is None
    assert 0 < result.wall_time_s < 5 and result.cpu_time_s >= 0 and result.max_rss_kib >= 0


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
