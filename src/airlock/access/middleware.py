"""ASGI middleware that audits every request after its response has been fully sent."""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from airlock.access.audit import AuditRecord, AuditWriter
from airlock.web.errors import error_body
from airlock.web.routing import allowed_methods

log = logging.getLogger(__name__)
UNAUDITED = ("/healthz", "/readyz", "/docs", "/redoc", "/openapi.json", "/favicon.ico")
# Request ids: a random tag per process and a counter, unique across processes and replicas
# without drawing randomness (uuid4) on every request.
_PROCESS_TAG = os.urandom(6).hex()
_COUNTER = itertools.count()


def _new_process_tag() -> None:
    global _PROCESS_TAG
    _PROCESS_TAG = os.urandom(6).hex()


os.register_at_fork(after_in_child=_new_process_tag)


def new_request_id() -> str:
    """Return a new request id such as ``req_3f9c0a1b2c4d000000000017``."""
    return f"req_{_PROCESS_TAG}{next(_COUNTER):012x}"


@dataclass
class AuditContext:
    """Facts about one request, filled in by dependencies and routes as they learn them."""

    request_id: str
    actor_type: str = "anonymous"
    actor: str | None = None
    evaluator_id: str | None = None
    grant_id: str | None = None
    key_id: str | None = None
    model: str | None = None
    version_id: str | None = None
    variant: str | None = None
    scope: str | None = None
    outcome: str | None = None
    error_code: str | None = None
    tokens_in: int = 0
    tokens_out: int = 0
    detail: dict[str, Any] = field(default_factory=dict)


def _outcome(ctx: AuditContext, status: int) -> str:
    if ctx.outcome:
        return ctx.outcome
    if status < 400:
        return "allowed"
    if status in (401, 403, 429):
        return "denied"
    return "error" if status >= 500 else "rejected"


class AuditMiddleware:
    """Creates the request's AuditContext, enforces the body size limit, and records the event."""

    def __init__(self, app: ASGIApp, writer: AuditWriter, max_body_bytes: int, max_upload_bytes: int = 0) -> None:
        self.app = app
        self.writer = writer
        self.max_body_bytes = max_body_bytes
        # File uploads have their own, usually larger, limit (checked exactly by the route);
        # here they only get headroom for the multipart envelope.
        self.max_upload_bytes = max(max_body_bytes, max_upload_bytes + 64 * 1024)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI call."""
        if scope["type"] != "http" or scope["path"] in UNAUDITED:
            await self.app(scope, receive, send)
            return
        await self.audited(scope, send, lambda send_wrapper: self.app(scope, receive, send_wrapper))

    def too_large(self, scope: Scope) -> bool:
        """Whether the request declares a body above its limit (``audited`` answers those with a 413)."""
        length = dict(scope.get("headers", [])).get(b"content-length")
        limit = self.max_upload_bytes if scope["path"] == "/v1/files" else self.max_body_bytes
        return length is not None and length.isdigit() and int(length) > limit

    async def audited(
        self, scope: Scope, send: Send, handler: Callable[[Send], Awaitable[None]], started: float | None = None
    ) -> None:
        """Run ``handler`` (given the ``send`` to answer through) as one audited request.

        The request gets its AuditContext (``scope["airlock.audit"]``) and an ``x-request-id``
        header; a body declared too large is refused with a 413, an unhandled error becomes a JSON
        500; whatever happens, one audit event is recorded once the answer is sent. ``started``:
        when the request began (``time.perf_counter()``), if before this call.
        """
        ctx = AuditContext(request_id=new_request_id())
        scope["airlock.audit"] = ctx
        started = time.perf_counter() if started is None else started
        status = 500
        response_started = False
        self.writer.begin()

        async def send_wrapper(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", ctx.request_id.encode()))
                message["headers"] = headers
            await send(message)

        try:
            if self.too_large(scope):
                limit = self.max_upload_bytes if scope["path"] == "/v1/files" else self.max_body_bytes
                ctx.error_code = "request_too_large"
                message = f"request body exceeds {limit} bytes"
                await _send_json(send_wrapper, 413, error_body(message, "invalid_request_error", "request_too_large"))
                return
            await handler(send_wrapper)
        except Exception:
            # The last line of defence: a bug must not reach the client as a traceback, and its
            # request must still be audited (Starlette's own handler runs outside this middleware).
            log.exception("unhandled error in request %s", ctx.request_id)
            ctx.error_code = "internal_error"
            if not response_started:
                message = f"internal error (request {ctx.request_id}); the operator has the details"
                await _send_json(send_wrapper, 500, error_body(message, "internal_error", "internal_error"))
        finally:
            self.writer.record(
                AuditRecord(
                    request_id=ctx.request_id,
                    method=scope["method"],
                    path=scope["path"][:200],
                    status_code=status,
                    outcome=_outcome(ctx, status),
                    actor_type=ctx.actor_type,
                    actor=ctx.actor,
                    evaluator_id=ctx.evaluator_id,
                    grant_id=ctx.grant_id,
                    key_id=ctx.key_id,
                    model=ctx.model[:200] if ctx.model else None,
                    version_id=ctx.version_id,
                    variant=ctx.variant,
                    scope=ctx.scope,
                    error_code=ctx.error_code,
                    tokens_in=ctx.tokens_in,
                    tokens_out=ctx.tokens_out,
                    latency_ms=round((time.perf_counter() - started) * 1000, 3),
                    detail=ctx.detail,
                ),
                end=True,
            )


class OptionsMiddleware:
    """Answers ``OPTIONS`` on any served path with 204 and an ``Allow`` listing every method the path supports.

    Starlette would answer 405 naming only the first matching route's methods; a path served by
    several routes (``GET`` and ``POST /v1/files``) needs them all. A path no route serves falls
    through to the router's 404.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI call."""
        if scope["type"] == "http" and scope["method"] == "OPTIONS":
            methods = allowed_methods(scope["app"], scope["path"])
            if methods:
                headers = [(b"allow", ", ".join(methods).encode()), (b"content-length", b"0")]
                await send({"type": "http.response.start", "status": 204, "headers": headers})
                await send({"type": "http.response.body", "body": b""})
                return
        await self.app(scope, receive, send)


async def _send_json(send: Send, status: int, body: dict[str, Any]) -> None:
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": payload})
