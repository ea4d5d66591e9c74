"""LoRA adapter views: a `LocalBackend` that runs every request with one adapter on its parent's worker.

A view owns nothing but the adapter's name; the worker, tokenizer, configuration and counters are
its parent's. Its rows carry the name into the parent's batches, where peft applies each row's
adapter (``adapter_names=``), so requests to the base and to any adapter share forward passes.

`LocalBackend.adapter_view` builds views and a view is itself a `LocalBackend`, so the class that
joins the two lives beside `LocalBackend`; this module holds what a view does differently, as a
mixin over the few things it asks of its parent (`AdapterParent`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from airlock.backends.local.engine import Engine
from airlock.errors import BackendUnavailableError


class AdapterParent(Protocol):
    """What a view asks of the backend whose worker it shares."""

    async def start(self) -> None:
        """Start the backend's worker."""
        ...

    async def _ready(self) -> Engine:
        """Return the started engine (starting it if needed)."""
        ...

    async def load_adapter(self, name: str, path: Path) -> None:
        """Load LoRA adapter ``name`` into the backend."""
        ...


class AdapterViewMixin:
    """How an adapter view differs from a `LocalBackend`: it reads all state from its parent."""

    _adapter: str | None

    def __init__(self, parent: AdapterParent, adapter: str) -> None:
        # No LocalBackend.__init__: all state (engine, tokenizer, config) is read from the parent.
        self._parent = parent
        self._adapter = adapter

    def __getattr__(self, name: str) -> Any:
        return getattr(self._parent, name)

    async def start(self) -> None:
        """Start the parent backend (the view has no worker of its own)."""
        await self._parent.start()

    async def aclose(self) -> None:
        """Do nothing: the parent owns the worker."""

    async def _ready(self) -> Engine:
        engine = await self._parent._ready()
        if self._adapter not in engine.adapters:  # the parent was restarted without it
            raise BackendUnavailableError(f"adapter {self._adapter!r} is not loaded")
        return engine

    async def load_adapter(self, name: str, path: Path) -> None:
        """Load an adapter into the parent backend."""
        await self._parent.load_adapter(name, path)
