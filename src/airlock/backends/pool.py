"""Live backends, created on first use and shared by every variant with the same backend settings."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from airlock.backends.base import ModelBackend
from airlock.backends.registry import create_backend
from airlock.errors import ConfigError
from airlock.registry.service import ResolvedVariant

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VariantRuntimeSpec:
    """What is needed to serve a variant, detached from the database session."""

    variant_id: str
    backend: str
    backend_config: dict[str, Any]
    mitigations: list[dict[str, Any]]

    @classmethod
    def of(cls, variant: ResolvedVariant) -> VariantRuntimeSpec:
        """Take what serving needs from a resolved variant."""
        return cls(
            variant_id=variant.variant_id,
            backend=variant.backend,
            backend_config=variant.backend_config,
            mitigations=variant.mitigations,
        )

    def backend_key(self) -> str:
        """Identify the underlying backend: variants with equal backend settings share one."""
        return self.backend + ":" + json.dumps(self.backend_config, sort_keys=True)

    def pipeline_key(self) -> str:
        """Identify the pipeline: changes to backend or mitigations make a new one."""
        # Every request builds a spec from the registry cache's variant, so the same config and
        # mitigation objects come back again and again: their key is remembered by identity (the
        # entry holds them, so an id cannot be reused while it is there). Nothing mutates them.
        memo = _PIPELINE_KEYS.get((id(self.backend_config), id(self.mitigations)))
        if (
            memo is not None
            and memo[0] is self.backend_config
            and memo[1] is self.mitigations
            and memo[2] == (self.variant_id, self.backend)
        ):
            return memo[3]
        body = json.dumps([self.backend_key(), self.mitigations], sort_keys=True)
        key = self.variant_id + ":" + hashlib.sha256(body.encode()).hexdigest()[:16]
        if len(_PIPELINE_KEYS) >= 1024:
            _PIPELINE_KEYS.clear()
        _PIPELINE_KEYS[(id(self.backend_config), id(self.mitigations))] = (
            self.backend_config,
            self.mitigations,
            (self.variant_id, self.backend),
            key,
        )
        return key


_PIPELINE_KEYS: dict[tuple[int, int], tuple[dict[str, Any], list[dict[str, Any]], tuple[str, str], str]] = {}


@runtime_checkable
class AdapterHost(Protocol):
    """A backend that serves LoRA adapters next to its base model (local weights, a vLLM server)."""

    @property
    def adapters(self) -> tuple[str, ...]:
        """Names of the adapters loaded."""
        ...

    async def load_adapter(self, name: str, path: Path) -> None:
        """Load adapter ``name`` from the ``save_pretrained`` directory ``path``."""
        ...

    def adapter_view(self, name: str) -> ModelBackend:
        """Return a backend whose requests run with adapter ``name``."""
        ...


def weights_spec(spec: VariantRuntimeSpec) -> VariantRuntimeSpec | None:
    """Return the local-weights spec of a variant: itself when local, its lab-side ``weights`` for a vLLM upstream.

    Work that needs the weights in transformers (interpretability) runs on a model worker built
    from this spec; None when the variant has no weights the lab's workers can load.
    """
    if spec.backend == "local":
        return spec
    config = spec.backend_config
    if spec.backend == "openai_upstream" and config.get("engine") == "vllm" and isinstance(config.get("weights"), str):
        local: dict[str, Any] = {"model": config["weights"]}
        for key in ("device", "dtype"):
            if isinstance(config.get("worker_" + key), str):
                local[key] = config["worker_" + key]
        return VariantRuntimeSpec(spec.variant_id, "local", local, spec.mitigations)
    return None


class BackendPool:
    """Creates, starts and caches backends (mitigations are wrapped around them by the serving package)."""

    def __init__(self, create: Callable[[VariantRuntimeSpec], ModelBackend] | None = None) -> None:
        # ``create`` lets the interface put another worker plane behind local weights (Ray model workers).
        self._create = create or (lambda spec: create_backend(spec.backend, spec.backend_config))
        self._backends: dict[str, ModelBackend] = {}
        self._lock = asyncio.Lock()

    async def backend(self, spec: VariantRuntimeSpec) -> ModelBackend:
        """Return the started raw backend for ``spec`` (no mitigations)."""
        key = spec.backend_key()
        backend = self._backends.get(key)
        if backend is not None:
            return backend
        async with self._lock:
            backend = self._backends.get(key)
            if backend is None:
                backend = self._create(spec)
                log.info("starting %s backend for variant %s", spec.backend, spec.variant_id)
                await backend.start()
                self._backends[key] = backend
            return backend

    async def adapter_backend(self, spec: VariantRuntimeSpec, name: str, path: Path) -> ModelBackend:
        """Return a view of the variant's backend running LoRA adapter ``name`` (loaded from ``path`` once).

        The adapter is loaded next to the shared base model (a local backend's, or a vLLM server's
        through its runtime LoRA API); the base is never reloaded.
        """
        backend = await self.backend(spec)
        if not isinstance(backend, AdapterHost):
            raise ConfigError(f"variant {spec.variant_id} is not served from weights that can take adapters")
        async with self._lock:
            if name not in backend.adapters:
                await backend.load_adapter(name, path)
        return backend.adapter_view(name)

    async def discard(self, spec: VariantRuntimeSpec) -> None:
        """Retire and forget the backend of ``spec`` (a noise-injected variant's copy of the weights)."""
        async with self._lock:
            backend = self._backends.pop(spec.backend_key(), None)
        if backend is not None:
            await backend.retire()

    async def aclose(self) -> None:
        """Close every backend."""
        for backend in self._backends.values():
            try:
                await backend.aclose()
            except Exception:  # closing must go on for the others
                log.exception("closing backend failed")
        self._backends.clear()
