"""The runner's lean, read-only Python: the interpreter, its standard library, numpy and the client.

The sandbox drops root to ``nobody``, which often cannot reach the host's interpreter (pyenv
under ``/root`` is mode 0700) and must not see the virtualenv's other packages anyway. So the
host builds, once per process, a mirror in a world-readable temporary directory: hard links
(copies across filesystems) of the interpreter, its shared library and standard library, of
numpy and scikit-learn when installed (with the files of every distribution they require, from
the installed metadata) and of the few Airlock modules
the runner needs. The interpreter's mirror is mounted at its original prefix (its RPATH and
``sys.prefix`` still hold) unless that prefix is already a system directory, and the packages
at ``/opt/airlock/site``. Importing torch in the runner is impossible by construction.
"""

from __future__ import annotations

import atexit
import importlib.metadata
import os
import re
import shutil
import sys
import sysconfig
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

__all__ = ["RUNTIME_TARGET", "Runtime", "ensure_runtime"]

RUNTIME_TARGET = "/opt/airlock"
# Distributions the runner may import besides the standard library, with their (non-extra)
# requirements: numpy always, scikit-learn (scipy, joblib, ...) when installed.
RUNNER_DISTRIBUTIONS = ("numpy", "scikit-learn")
_REQUIREMENT_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
_STDLIB_SKIP = frozenset({"site-packages", "dist-packages", "test", "idlelib", "tkinter", "turtledemo", "ensurepip"})
_AIRLOCK_MODULES = ("_wire.py", "client.py", "nnsight.py", "runner.py")
_SYSTEM_PREFIXES = ("/usr", "/bin", "/lib", "/lib64")


@dataclass(frozen=True)
class Runtime:
    """A built runtime: the command that starts the runner and the mounts it needs."""

    root: Path
    argv: list[str]
    mounts: list[tuple[Path, str]]


_lock = threading.Lock()
_built: Runtime | None = None


def ensure_runtime() -> Runtime:
    """Return this process's runner runtime, building it on first use (about a second)."""
    global _built
    with _lock:
        if _built is None or not _built.root.is_dir():
            _sweep_orphans()
            _built = _build()
            atexit.register(shutil.rmtree, _built.root, True)
        return _built


_PREFIX = "airlock-interp-runtime-"
_OWNER = "owner.pid"


def _sweep_orphans() -> None:
    """Remove runtimes left behind by processes that died without running their exit handlers."""
    for root in Path(tempfile.gettempdir()).glob(_PREFIX + "*"):
        try:
            pid = int((root / _OWNER).read_text())
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(root, ignore_errors=True)  # its owner is gone (e.g. SIGKILL)
        except (OSError, ValueError):
            continue  # still being built, someone else's, or alive: leave it


def _place(src: Path, dst: Path) -> None:
    """Hard-link ``src`` at ``dst`` (a copy when linking is impossible); keep relative symlinks."""
    if src.is_symlink():
        target = os.readlink(src)
        if not os.path.isabs(target):
            os.symlink(target, dst)
            return
        src = src.resolve()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _mirror(src: Path, dst: Path, *, skip: frozenset[str] = frozenset()) -> None:
    if src.is_file() or (src.is_symlink() and not src.is_dir()):
        _place(src, dst)
        return
    dst.mkdir(parents=True, exist_ok=True)
    for root, dirs, files in os.walk(src):
        rel = Path(root).relative_to(src)
        if rel == Path("."):
            dirs[:] = [d for d in dirs if d not in skip]
        for name in dirs:
            path = Path(root) / name
            if path.is_symlink():
                _place(path, dst / rel / name)
            else:
                (dst / rel / name).mkdir(exist_ok=True)
        dirs[:] = [d for d in dirs if not (Path(root) / d).is_symlink()]
        for name in files:
            _place(Path(root) / name, dst / rel / name)


def _closure(names: tuple[str, ...]) -> list[importlib.metadata.Distribution]:
    """Return the installed distributions ``names`` and everything they require (extras excluded)."""
    found: dict[str, importlib.metadata.Distribution] = {}
    pending = list(names)
    while pending:
        name = pending.pop().lower().replace("_", "-")
        if name in found:
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # optional (scikit-learn), or provided some other way
        found[name] = dist
        for requirement in dist.requires or []:
            _spec, _, marker = requirement.partition(";")
            match = _REQUIREMENT_NAME.match(requirement)
            if match and "extra" not in marker:
                pending.append(match.group(1))
    return list(found.values())


def _build() -> Runtime:
    root = Path(tempfile.mkdtemp(prefix=_PREFIX))
    (root / _OWNER).write_text(str(os.getpid()))
    executable = Path(os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable))
    base = Path(sys.base_prefix)
    mounts: list[tuple[Path, str]] = []
    if not str(base).startswith(_SYSTEM_PREFIXES):
        # Mirror just the interpreter: its binary, shared library and standard library.
        python = root / "python"
        (python / "bin").mkdir(parents=True)
        _place(executable, python / "bin" / executable.name)
        libdir = Path(sysconfig.get_config_var("LIBDIR") or base / "lib")
        (python / "lib").mkdir(exist_ok=True)
        if libdir.is_dir():
            for lib in libdir.glob("libpython*"):
                if lib.is_file() or lib.is_symlink():
                    _place(lib, python / "lib" / lib.name)
        stdlib = Path(sysconfig.get_paths(vars={"installed_base": str(base), "base": str(base)})["stdlib"])
        _mirror(stdlib, python / stdlib.relative_to(base), skip=_STDLIB_SKIP)
        mounts.append((python, str(base)))
        inside_exe = str(base / executable.relative_to(base)) if executable.is_relative_to(base) else None
        if inside_exe is None:
            inside_exe = str(base / "bin" / executable.name)
    else:
        inside_exe = str(executable)
    site = root / "site"
    site.mkdir()
    for dist in _closure(RUNNER_DISTRIBUTIONS):
        for entry in dist.files or []:
            if entry.parts and entry.parts[0] == "..":
                continue  # scripts and data outside site-packages
            source = Path(str(dist.locate_file(entry)))
            if source.is_file():
                (site / entry).parent.mkdir(parents=True, exist_ok=True)
                _place(source, site / entry)
    here = Path(__file__).parent
    (site / "airlock" / "interp").mkdir(parents=True)
    (site / "airlock" / "__init__.py").write_text('"""Airlock, as much of it as an interp runner needs."""\n')
    (site / "airlock" / "interp" / "__init__.py").write_text('"""The interp runner and client library."""\n')
    for module in _AIRLOCK_MODULES:
        shutil.copyfile(here / module, site / "airlock" / "interp" / module)
    mounts.append((site, f"{RUNTIME_TARGET}/site"))
    # World-readable so the sandbox's unprivileged host uid can bind-mount it.
    for path, dirs, _files in os.walk(root):
        os.chmod(path, 0o755)
        for name in dirs:
            if not (Path(path) / name).is_symlink():
                os.chmod(Path(path) / name, 0o755)
    boot = (
        f"import sys; sys.path.insert(0, {RUNTIME_TARGET + '/site'!r}); "
        "from airlock.interp.runner import main; raise SystemExit(main())"
    )
    # -I: no environment variables, user site or script directory on sys.path; -S: no site
    # module, so only the mirrored packages can be imported; -B: the runtime stays read-only.
    return Runtime(root=root, argv=[inside_exe, "-I", "-S", "-B", "-c", boot], mounts=mounts)
