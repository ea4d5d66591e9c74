"""One factory that turns every exception into an OpenAI-shaped JSON error; nothing else leaks."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Scope

from airlock.errors import AirlockError, BackendUnavailableError, RateLimitError
from airlock.web.routing import allowed_methods

log = logging.getLogger(__name__)

_HTTP_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
}


class ErrorDetail(BaseModel):
    """What went wrong, in OpenAI's error shape."""

    message: str = Field(description="A readable explanation.")
    type: str = Field(description="`invalid_request_error`, `authentication_error`, `permission_error`, ...")
    param: str | None = Field(default=None, description="The request field at fault, when one is.")
    code: str | None = Field(default=None, description="A stable, machine-readable reason.")


class ErrorResponse(BaseModel):
    """The body of every error response."""

    error: ErrorDetail


def error_body(message: str, error_type: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """Return an OpenAI error body."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def _audit_error(request: Request, code: str | None) -> None:
    ctx = request.scope.get("airlock.audit")
    if ctx is not None and code:
        ctx.error_code = code


def _format_validation(exc: RequestValidationError) -> tuple[str, str | None]:
    parts = []
    param = None
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        if err.get("type") == "json_invalid":
            return "the request body is not valid JSON", None
        if param is None and loc:
            param = loc[0]
        where = ".".join(loc) or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts), param


def airlock_error_response(scope: Scope, exc: AirlockError) -> JSONResponse:
    """Return the response for an ``AirlockError``, noting its code and outcome in the request's audit context."""
    if exc.status_code >= 500:
        log.error("%s: %s", type(exc).__name__, exc.message)
    ctx = scope.get("airlock.audit")
    if ctx is not None:
        if exc.code:
            ctx.error_code = exc.code
        if exc.audit_outcome:
            ctx.outcome = exc.audit_outcome
            ctx.detail.update(exc.audit_detail)
    headers = {}
    if isinstance(exc, RateLimitError | BackendUnavailableError) and exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, int(exc.retry_after + 0.999)))
    return JSONResponse(exc.to_openai(), status_code=exc.status_code, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Register handlers so every error leaves as ``{"error": {...}}`` with the right status."""

    @app.exception_handler(AirlockError)
    async def _airlock(request: Request, exc: AirlockError) -> JSONResponse:
        return airlock_error_response(request.scope, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _format_validation(exc)
        _audit_error(request, "invalid_request")
        return JSONResponse(error_body(message, "invalid_request_error", "invalid_request", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 404:
            code, message = "not_found", f"no such endpoint: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            # Starlette names the methods of the first route matching the path; the path may have several.
            allow = ", ".join(allowed_methods(request.app, request.url.path))
            headers["Allow"] = allow
            code, message = "method_not_allowed", f"{request.method} is not allowed on {request.url.path}; use {allow}"
        else:
            code, message = f"http_{exc.status_code}", str(exc.detail)
        _audit_error(request, code)
        return JSONResponse(
            error_body(message, _HTTP_TYPES.get(exc.status_code, "invalid_request_error"), code),
            status_code=exc.status_code,
            headers=headers or None,
        )
