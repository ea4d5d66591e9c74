"""The runner's lean Python mirror: one per process, and those of dead processes swept."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from airlock.interp import _runtime


def test_runtimes_of_dead_processes_are_swept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan, alive, building = (tmp_path / f"{_runtime._PREFIX}{n}" for n in ("a", "b", "c"))
    for root in (orphan, alive, building):
        root.mkdir()
    (orphan / _runtime._OWNER).write_text(dead.stdout.strip())
    (alive / _runtime._OWNER).write_text(str(os.getpid()))
    _runtime._sweep_orphans()
    assert not orphan.exists() and alive.is_dir() and building.is_dir()
