"""The sandbox's one error type, below every other module of the package so each can raise it."""

from __future__ import annotations

from airlock.errors import AirlockError

__all__ = ["SandboxError"]


class SandboxError(AirlockError):
    """The sandbox itself could not run (bwrap missing or failing to set up), not the command."""

    error_type = "sandbox_error"
