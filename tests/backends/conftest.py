"""Fixtures for backend tests: a shared converted-model cache and session-wide local backends."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from airlock.config import reset_settings

if TYPE_CHECKING:  # importing it at runtime would load torch for every backend test module
    from airlock.backends.local import LocalBackend

#: Converted weights are cached beside the repo (gitignored) so the GGUF is dequantized once, ever.
MODEL_CACHE = Path(__file__).resolve().parents[2] / ".cache" / "models"


@pytest.fixture(scope="session")
def model_cache() -> Iterator[Path]:
    """Point ``AIRLOCK_MODEL_CACHE`` at the repo's shared cache for session-scoped model loads."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AIRLOCK_MODEL_CACHE", str(MODEL_CACHE))
        mp.setenv("HF_HUB_OFFLINE", "1")
        reset_settings()
        yield MODEL_CACHE
    reset_settings()


def _started(config: dict[str, object]) -> LocalBackend:
    from airlock.backends.local import LocalBackend

    backend = LocalBackend.from_config(config)
    # The backend keeps no event-loop state, so one loaded model serves every test's own loop.
    asyncio.run(backend.start())
    return backend


@pytest.fixture(scope="session")
def tiny_backend(model_cache: Path) -> Iterator[LocalBackend]:
    """A started ``tiny-random`` LocalBackend shared by the whole session."""
    backend = _started({"model": "tiny-random", "max_batch_size": 8, "batch_wait_ms": 20})
    yield backend
    asyncio.run(backend.aclose())


@pytest.fixture(scope="session")
def smol_backend(model_cache: Path) -> Iterator[LocalBackend]:
    """A started LocalBackend on the real embedded SmolLM2-135M (converted once into the cache)."""
    backend = _started({"model": "embedded:smollm2-135m", "max_batch_size": 8})
    yield backend
    asyncio.run(backend.aclose())
