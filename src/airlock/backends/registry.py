"""Backends by name: built-in and third-party factories, each imported only when first used.

A manifest names a backend type (``backend: local``). The built-in types are listed here as
import paths, so importing this module loads neither torch nor an HTTP client. Other packages add
a type through the ``airlock.backends`` entry-point group, naming a class with a
``from_config(config)`` classmethod or a factory ``config -> ModelBackend``::

    [project.entry-points."airlock.backends"]
    my_backend = "my_package.backend:MyBackend"
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from airlock.backends.base import ModelBackend
from airlock.errors import ConfigError

log = logging.getLogger(__name__)

BackendFactory = Callable[[dict[str, Any]], ModelBackend]
ENTRY_POINT_GROUP = "airlock.backends"
BUILTIN: dict[str, str] = {
    "local": "airlock.backends.local:LocalBackend",
    "openai_upstream": "airlock.backends.openai_upstream:OpenAIUpstreamBackend",
}
_factories: dict[str, BackendFactory] = {}


def register_backend(kind: str, factory: BackendFactory) -> None:
    """Register ``factory`` as the constructor of backends of type ``kind`` (replacing any other)."""
    _factories[kind] = factory


def _as_factory(target: Any, where: str) -> BackendFactory:
    from_config = getattr(target, "from_config", None)
    if callable(from_config):
        return from_config  # type: ignore[no-any-return]
    if callable(target):
        return target  # type: ignore[no-any-return]
    raise ConfigError(f"backend {where} is neither a class with from_config() nor a factory")


def _load_path(path: str) -> BackendFactory:
    module, _, attr = path.partition(":")
    return _as_factory(getattr(importlib.import_module(module), attr), path)


def available_backends() -> list[str]:
    """Return every backend type that can be created: registered, built in, or installed."""
    names = set(_factories) | set(BUILTIN) | {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}
    return sorted(names)


def _find(kind: str) -> BackendFactory:
    if kind in _factories:
        return _factories[kind]
    if kind in BUILTIN:
        factory = _load_path(BUILTIN[kind])
    else:
        found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == kind]
        if not found:
            known = ", ".join(available_backends()) or "none"
            raise ConfigError(f"unknown backend type {kind!r} (known: {known})")
        try:
            factory = _as_factory(found[0].load(), found[0].value)
        except ConfigError:
            raise
        except Exception as exc:  # a broken plugin must name itself, not crash start-up with a traceback
            raise ConfigError(f"backend {kind!r} ({found[0].value}) could not be loaded: {exc}") from exc
    _factories[kind] = factory
    return factory


def create_backend(kind: str, config: dict[str, Any]) -> ModelBackend:
    """Instantiate a backend of type ``kind`` from its manifest ``config``."""
    return _find(kind)(config)
