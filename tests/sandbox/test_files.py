"""Host-side access to sandbox directories: no symlink, '..' or FIFO leads the host out or hangs it."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path, PurePosixPath

import pytest

from airlock.sandbox import ensure_regular, remove_tree, safe_open_beneath
from tests.conftest import needs_bwrap


@needs_bwrap
def test_safe_open_beneath_refuses_escapes(workdir: Path) -> None:
    outside = Path(tempfile.mkdtemp(prefix="airlock-outside-"))
    (outside / "secret").write_text("host secret")
    (workdir / "sub").mkdir()
    (workdir / "sub" / "ok.txt").write_text("fine")
    (workdir / "link").symlink_to(outside / "secret")
    (workdir / "dirlink").symlink_to(outside)
    os.mkfifo(workdir / "fifo")
    try:
        fd = safe_open_beneath(workdir, PurePosixPath("sub/ok.txt"), os.O_RDONLY)
        assert os.read(fd, 10) == b"fine"
        os.close(fd)
        for bad in ("link", "dirlink/secret", "../" + outside.name + "/secret", "sub/../../x"):
            with pytest.raises(PermissionError):
                os.close(safe_open_beneath(workdir, PurePosixPath(bad), os.O_RDONLY))
        with pytest.raises(PermissionError):
            os.close(safe_open_beneath(workdir, PurePosixPath("link"), os.O_WRONLY | os.O_TRUNC))
        assert (outside / "secret").read_text() == "host secret"
        fd = safe_open_beneath(workdir, PurePosixPath("fifo"), os.O_RDONLY)  # must not block
        with pytest.raises(PermissionError, match="regular"):
            ensure_regular(fd, "fifo")
        os.close(fd)
        fd = safe_open_beneath(workdir, PurePosixPath("new/deep/file"), os.O_WRONLY | os.O_CREAT, create_dirs=True)
        assert stat.S_ISREG(os.fstat(fd).st_mode)
        os.close(fd)
    finally:
        remove_tree(outside)


def test_remove_tree_deletes_what_the_sandbox_locked_and_follows_no_link(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir(mode=0o755)
    (outside / "keep").write_text("host file")
    root = tmp_path / "work"
    (root / "locked" / "deeper").mkdir(parents=True)
    (root / "locked" / "deeper" / "file").write_text("x")
    (root / "locked" / "link").symlink_to(outside)
    (root / "locked" / "deeper").chmod(0)
    (root / "locked").chmod(0)
    remove_tree(root)
    assert not root.exists()
    assert (outside / "keep").read_text() == "host file" and stat.S_IMODE(outside.stat().st_mode) == 0o755
    remove_tree(root)  # already gone: nothing to do
