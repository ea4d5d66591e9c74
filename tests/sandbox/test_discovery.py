"""Finding bwrap and checking it is recent enough."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from airlock.sandbox import BwrapSandbox, SandboxError, bwrap_version, find_bwrap
from airlock.sandbox.discovery import SYSTEM_PATH, system_tool
from tests.conftest import needs_bwrap


@needs_bwrap
def test_bwrap_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIRLOCK_BWRAP", raising=False)
    assert os.access(find_bwrap(), os.X_OK)
    monkeypatch.setenv("AIRLOCK_BWRAP", "/nonexistent/bwrap")
    with pytest.raises(SandboxError, match="AIRLOCK_BWRAP"):
        find_bwrap()


def _fake_bwrap(directory: Path, version_output: str) -> str:
    directory.mkdir()
    path = directory / "bwrap"
    path.write_text(f"#!/bin/sh\necho '{version_output}'\n")
    path.chmod(0o755)
    return str(path)


def test_bwrap_too_old_or_unrecognised_is_refused_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recent = _fake_bwrap(tmp_path / "recent", "bubblewrap 0.11.0")
    monkeypatch.setenv("AIRLOCK_BWRAP", recent)
    assert find_bwrap() == recent and bwrap_version(recent) == (0, 11, 0)
    with pytest.raises(SandboxError, match=r"bubblewrap 0\.8\.0; Airlock needs >= 0\.10\.0"):
        BwrapSandbox(bwrap=_fake_bwrap(tmp_path / "old", "bubblewrap 0.8"))
    with pytest.raises(SandboxError, match="unrecognised bwrap version output"):
        bwrap_version(_fake_bwrap(tmp_path / "odd", "bubblewrap (git)"))


def test_tools_run_inside_come_from_the_system_directories_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "only-on-path").write_text("#!/bin/sh\n")
    (tmp_path / "only-on-path").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    with pytest.raises(SandboxError, match="not found in the system directories"):
        system_tool("only-on-path")  # the sandbox mounts no such directory
    assert Path(system_tool("prlimit")).parent in {Path(part) for part in SYSTEM_PATH.split(":")}
