"""Crash-safe writes: a file or a directory appears whole under its name, or not at all."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

__all__ = ["build_directory_atomically", "write_atomically"]


def _fsync_directory(path: Path) -> None:
    """Flush a directory's entries so a rename inside it survives a crash."""
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` under a temporary name, flushed to disk, then renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        with tmp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # fsync the directory so the rename itself survives a crash before the row that names the file commits.
    _fsync_directory(path.parent)


def build_directory_atomically(final: Path, build: Callable[[Path], None], *, replace: bool) -> Path:
    """Run ``build(tmp)`` in a temporary sibling directory, then rename it to ``final``; return ``final``.

    With ``replace`` an existing ``final`` is swapped for the new copy (the old one is renamed
    aside first, so ``final`` is always the old or the new copy, never half of one). Without it an
    existing ``final`` is kept: ``build`` does not run, and a concurrent builder that wins the
    race is reused (its copy is equivalent). Temporary names start with ``.{final.name}.tmp-``.
    """
    if not replace and final.is_dir():
        return final
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".{final.name}.tmp-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        build(tmp)
        if replace and final.exists():
            old = parent / f".{final.name}.old-{secrets.token_hex(4)}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                tmp.rename(final)
            except OSError:
                if replace or not final.is_dir():
                    raise
                # Another process finished first; its copy is equivalent.
        _fsync_directory(parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
