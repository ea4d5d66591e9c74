"""Persistent job queue: a DB-backed state machine with an in-process worker pool."""

# The modules other packages may import (a test holds every import across packages to this list).
__all__ = [
    "executor",
    "models",
    "periodic",
    "runner",
    "service",
]
