"""What interp refuses: a job without a result it may release, a request the host will not run, a forbidden patch."""

from __future__ import annotations

from airlock.errors import AirlockError


class InterpJobError(AirlockError):
    """An interp job ended without a result it may release; ``code`` names why."""

    status_code = 422
    error_type = "interp_job_error"


class RequestError(Exception):
    """A request the host refuses; the message goes back to the evaluator's code."""


class PatchRefused(RequestError):
    """A patch the output policy forbids; it fails the job (``code``) even if the code catches it."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code
