"""Airlock's exception tree; the gateway maps each class to an OpenAI-shaped HTTP error.

```
AirlockError (500, internal_error)
├── InvalidRequestError (400, invalid_request_error)
├── AuthenticationError (401, authentication_error)
├── PermissionDeniedError (403, permission_error)
├── NotFoundError (404, not_found_error)
├── ConflictError (409, conflict_error)
├── RateLimitError (429, rate_limit_error)
├── BackendError (502, backend_error)      -- an upstream model server failed
├── BackendUnavailableError (503, backend_unavailable)
└── ConfigError (500, configuration_error) -- operator mistakes in airlock.yaml / settings
```
"""

from __future__ import annotations

from typing import Any, ClassVar


class AirlockError(Exception):
    """Base of every error Airlock raises on purpose."""

    status_code: ClassVar[int] = 500
    error_type: ClassVar[str] = "internal_error"
    default_code: ClassVar[str | None] = None
    audit_outcome: ClassVar[str | None] = None
    """The audit outcome of a request this error ends, when not the one its status implies (``alert``)."""

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.param = param

    @property
    def audit_detail(self) -> dict[str, Any]:
        """Facts for the audit row of a request this error ends (kept by the lab, never sent to the caller)."""
        return {}

    def to_openai(self) -> dict[str, Any]:
        """Return the OpenAI-style error body for this error."""
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequestError(AirlockError):
    """The request is malformed or asks for something impossible."""

    status_code = 400
    error_type = "invalid_request_error"


class AuthenticationError(AirlockError):
    """No credential, an unknown one, or a revoked one."""

    status_code = 401
    error_type = "authentication_error"
    default_code = "invalid_api_key"


class PermissionDeniedError(AirlockError):
    """The credential is valid but its grant does not allow this."""

    status_code = 403
    error_type = "permission_error"
    default_code = "permission_denied"


class NotFoundError(AirlockError):
    """The named model, grant, evaluator or other object does not exist."""

    status_code = 404
    error_type = "not_found_error"
    default_code = "not_found"


class ConflictError(AirlockError):
    """The object already exists or is in a state that forbids the change."""

    status_code = 409
    error_type = "conflict_error"
    default_code = "conflict"


class RateLimitError(AirlockError):
    """A quota (requests per minute, total tokens, ...) is exhausted."""

    status_code = 429
    error_type = "rate_limit_error"
    default_code = "rate_limit_exceeded"

    def __init__(self, message: str, *, code: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after


class BackendError(AirlockError):
    """A model backend failed while serving a valid request."""

    status_code = 502
    error_type = "backend_error"
    default_code = "backend_error"


class BackendUnavailableError(AirlockError):
    """A model backend cannot be reached or loaded right now."""

    status_code = 503
    error_type = "backend_unavailable"
    default_code = "backend_unavailable"

    def __init__(self, message: str, *, code: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after


class ConfigError(AirlockError):
    """The operator's configuration (settings, manifest) is invalid."""

    status_code = 500
    error_type = "configuration_error"
    default_code = "invalid_configuration"
