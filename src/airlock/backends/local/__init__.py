"""Local transformers backend: one worker thread batches all concurrent requests into shared forward passes."""

from airlock.backends.local.engine import BatchStats, LocalBackend, LocalBackendConfig

__all__ = ["BatchStats", "LocalBackend", "LocalBackendConfig"]
