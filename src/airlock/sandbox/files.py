"""Host-side access to directories a sandbox wrote into, which may hold anything its code planted.

Files are opened component by component relative to their parent's descriptor, never following a
symlink and never leaving the directory, and without blocking on a planted FIFO; a directory is
removed even where the sandboxed code made its entries unreadable.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from pathlib import Path, PurePosixPath

__all__ = ["ensure_regular", "remove_tree", "safe_open_beneath"]


def safe_open_beneath(
    root: Path,
    relative: PurePosixPath,
    flags: int,
    *,
    create_dirs: bool = False,
    owner: tuple[int, int] | None = None,
) -> int:
    """Open ``root/relative`` without following any symlink and without leaving ``root``.

    Every component is opened relative to its parent's descriptor with ``O_NOFOLLOW``, so a
    symlink planted by sandboxed code anywhere on the path raises :class:`PermissionError`
    instead of redirecting a host-side read or write; ``..`` components are rejected outright.
    New directories (``create_dirs``) and a newly created file are given to ``owner``.
    """
    parts = relative.parts
    if not parts or relative.is_absolute() or any(part in ("..", ".") for part in parts):
        raise PermissionError(errno.EACCES, "path escapes the sandbox", str(relative))
    dir_flags = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    dir_fd = os.open(root, dir_flags)
    try:
        for part in parts[:-1]:
            try:
                next_fd = os.open(part, dir_flags, dir_fd=dir_fd)
            except FileNotFoundError:
                if not create_dirs:
                    raise
                os.mkdir(part, 0o755, dir_fd=dir_fd)
                if owner is not None:
                    os.chown(part, *owner, dir_fd=dir_fd, follow_symlinks=False)
                next_fd = os.open(part, dir_flags, dir_fd=dir_fd)
            except OSError as exc:
                _raise_if_symlink(dir_fd, part, relative, exc)
                raise
            os.close(dir_fd)
            dir_fd = next_fd
        # O_NONBLOCK: a FIFO planted in the sandbox must not hang the host (regular files
        # ignore the flag); callers check the file type with ensure_regular().
        try:
            fd = os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o644, dir_fd=dir_fd)
        except OSError as exc:
            _raise_if_symlink(dir_fd, parts[-1], relative, exc)
            raise
        if owner is not None and flags & os.O_CREAT:
            os.fchown(fd, *owner)
        return fd
    finally:
        os.close(dir_fd)


def _raise_if_symlink(dir_fd: int, name: str, relative: PurePosixPath, exc: OSError) -> None:
    if exc.errno not in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
        return
    try:
        is_link = stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return
    if is_link:
        raise PermissionError(errno.EACCES, "symlinks are not followed out of the sandbox", str(relative)) from exc


def ensure_regular(fd: int, name: str) -> os.stat_result:
    """Return ``fstat(fd)``; raise if it is a directory or anything but a regular file."""
    info = os.fstat(fd)
    if stat.S_ISDIR(info.st_mode):
        raise IsADirectoryError(errno.EISDIR, "Is a directory", name)
    if not stat.S_ISREG(info.st_mode):
        raise PermissionError(errno.EACCES, "not a regular file", name)
    return info


def remove_tree(path: Path) -> None:
    """Delete a sandbox directory, including entries the sandboxed code made unreadable."""
    if not path.exists():
        return
    if os.geteuid() != 0:
        # Without root, directories the sandbox chmod-ed to 000 cannot be listed or emptied.
        _unlock_tree(str(path))
    shutil.rmtree(path, ignore_errors=True)


def _unlock_tree(directory: str) -> None:
    with contextlib.suppress(OSError):
        os.chmod(directory, 0o700)
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    _unlock_tree(entry.path)
