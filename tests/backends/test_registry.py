"""Backends are found by name: built-ins import lazily, third parties plug in through an entry point."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from airlock.backends import registry
from airlock.backends.base import ModelBackend
from airlock.errors import ConfigError


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An installed distribution (a dist-info on sys.path) that adds the backend type ``plugged``."""
    (tmp_path / "plugged_backend.py").write_text(
        textwrap.dedent(
            """
            from airlock.backends.base import ModelBackend

            class Plugged(ModelBackend):
                kind = "plugged"

                def __init__(self, greeting: str) -> None:
                    self.greeting = greeting

                @classmethod
                def from_config(cls, config):
                    return cls(config["greeting"])

            def broken(config):
                raise RuntimeError("never")
            """
        )
    )
    info = tmp_path / "plugged_backend-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: plugged-backend\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[airlock.backends]\nplugged = plugged_backend:Plugged\nnot_a_module = no_such_module_here:Thing\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "plugged"
    registry._factories.pop("plugged", None)
    sys.modules.pop("plugged_backend", None)


def test_a_third_party_backend_is_created_by_name(plugin: str) -> None:
    assert plugin in registry.available_backends()
    backend = registry.create_backend(plugin, {"greeting": "hi"})
    assert isinstance(backend, ModelBackend) and backend.greeting == "hi"  # type: ignore[attr-defined]


def test_unknown_and_broken_backends_are_config_errors(plugin: str) -> None:
    with pytest.raises(ConfigError, match=r"unknown backend type 'nope' \(known: .*local.*plugged"):
        registry.create_backend("nope", {})
    with pytest.raises(ConfigError, match="could not be loaded"):
        registry.create_backend("not_a_module", {})


def test_importing_the_registry_loads_no_backend() -> None:
    # The built-ins are import paths: naming them costs nothing until one is used.
    code = (
        "import sys, airlock.backends.registry as r; "
        "assert 'local' in r.available_backends(); "
        "assert 'airlock.backends.local' not in sys.modules and 'torch' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
