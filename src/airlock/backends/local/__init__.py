"""Local transformers backend: one worker thread batches all concurrent requests into shared forward passes.

Modules, each importing only those after it: `backend` (the OpenAI surface, `LocalBackend`),
`adapters` (LoRA adapter views), `engine` (the continuous-batching worker), `tokens` (token ids →
bytes) and `config` (`LocalBackendConfig`, `BatchStats`).
"""

from airlock.backends.local.backend import LocalBackend
from airlock.backends.local.config import BatchStats, LocalBackendConfig

__all__ = ["BatchStats", "LocalBackend", "LocalBackendConfig"]
