"""Crash-safe writes: files and directories appear whole or not at all."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from airlock.atomicfile import build_directory_atomically, write_atomically


def test_a_file_is_replaced_whole_and_no_temporary_is_left(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "item.bin"
    write_atomically(target, b"first")
    write_atomically(target, b"second")
    assert target.read_bytes() == b"second"
    assert [p.name for p in target.parent.iterdir()] == ["item.bin"]


def _writer(content: bytes) -> Callable[[Path], None]:
    def build(tmp: Path) -> None:
        (tmp / "weights.bin").write_bytes(content)

    return build


def test_replacing_a_directory_swaps_it_whole_and_a_failed_build_keeps_the_old_copy(tmp_path: Path) -> None:
    final = tmp_path / "checkpoint-4"
    build_directory_atomically(final, _writer(b"old"), replace=True)
    build_directory_atomically(final, _writer(b"new"), replace=True)
    assert (final / "weights.bin").read_bytes() == b"new"

    def broken(tmp: Path) -> None:
        (tmp / "weights.bin").write_bytes(b"half")
        raise RuntimeError("crash mid-save")

    with pytest.raises(RuntimeError):
        build_directory_atomically(final, broken, replace=True)
    assert (final / "weights.bin").read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-4"]


def test_without_replace_an_existing_directory_is_kept_and_not_rebuilt(tmp_path: Path) -> None:
    final = tmp_path / "model-abc"
    calls: list[Path] = []

    def build(tmp: Path) -> None:
        calls.append(tmp)
        (tmp / "model.safetensors").write_bytes(b"ok")

    assert build_directory_atomically(final, build, replace=False) == final
    assert build_directory_atomically(final, build, replace=False) == final
    assert len(calls) == 1 and (final / "model.safetensors").read_bytes() == b"ok"
