"""A lean HTTP/1.1 keep-alive client for the upstream's non-streaming JSON calls.

A proxied request's upstream call is one small POST and one small JSON answer. aiohttp's client
(a request and response object, a payload writer task, a stream reader, cookie and redirect
handling) cost more CPU than the rest of the proxied request; this client writes the request in
one ``write`` and parses the answer with httptools (the parser uvicorn serves with) straight into
a future. Connections are kept alive and reused, at most ``limit`` at once. Streaming stays on
aiohttp (``openai_upstream``), where per-chunk work dominates and its reader is worth having.

Failures are typed so the caller can tell retryable ones apart: :class:`ConnectFailed` (the
request never reached the server), :class:`Disconnected` (the server closed the connection
before answering in full, e.g. a stale keep-alive connection), :class:`BadResponse` (not
HTTP), and ``TimeoutError`` when the whole exchange outlasts its timeout.
"""

from __future__ import annotations

import asyncio
import ssl
import zlib
from collections import deque
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import httptools


class ConnectFailed(Exception):
    """The connection could not be opened (refused, unresolvable, or it timed out): nothing was sent."""


class Disconnected(Exception):
    """The server closed the connection before its answer was complete."""


class BadResponse(Exception):
    """The server's answer is not valid HTTP/1.1."""


@dataclass(frozen=True)
class Answer:
    """A complete HTTP answer: status, headers (names lower-cased) and the (decoded) body."""

    status: int
    headers: dict[str, str]
    body: bytes


class _Connection(asyncio.Protocol):
    """One keep-alive connection; answers exactly one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._parser = httptools.HttpResponseParser(self)
        self._future: asyncio.Future[Answer] | None = None
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._headers_done = False
        self._received = False
        self.reusable = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport."""
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        """Feed the parser; a parse error fails the request under way."""
        self._received = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(BadResponse(f"invalid HTTP answer: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        """Finish a body delimited by the connection's end, or fail the request under way."""
        self.closed = True
        future = self._future
        if future is None or future.done():
            return
        if self._headers_done and "content-length" not in self._headers and "transfer-encoding" not in self._headers:
            self.reusable = False
            self._finish()
            return
        self._future = None
        future.set_exception(Disconnected("the server closed the connection before answering in full"))

    # httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        """Collect a header (repeated names are joined with commas, as HTTP allows)."""
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        self._headers[key] = f"{self._headers[key]}, {text}" if key in self._headers else text

    def on_headers_complete(self) -> None:
        """Note that the body starts."""
        self._headers_done = True

    def on_body(self, body: bytes) -> None:
        """Collect a piece of the (de-chunked) body."""
        self._body.append(body)

    def on_message_complete(self) -> None:
        """Hand the answer to the request."""
        self.reusable = self._parser.should_keep_alive()
        self._finish()

    # the client side

    def send(self, request: bytes, future: asyncio.Future[Answer]) -> None:
        """Write a whole request; its answer resolves ``future``."""
        assert self.transport is not None
        self._future = future
        self._headers = {}
        self._body = []
        self._headers_done = False
        self._received = False
        self.reusable = False
        self.transport.write(request)

    @property
    def answered_nothing(self) -> bool:
        """Whether no byte of an answer came (the request may be retried on a fresh connection)."""
        return not self._received

    def close(self) -> None:
        """Close the connection."""
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _finish(self) -> None:
        future, self._future = self._future, None
        if future is None or future.done():
            return
        body = b"".join(self._body)
        encoding = self._headers.get("content-encoding", "identity").strip().lower()
        if encoding in ("gzip", "deflate"):
            try:
                # wbits 47: zlib or gzip framing, detected from the header
                body = zlib.decompress(body, 47)
            except zlib.error as exc:
                future.set_exception(BadResponse(f"invalid {encoding} body: {exc}"))
                return
        future.set_result(Answer(self._parser.get_status_code(), self._headers, body))

    def _fail(self, exc: Exception) -> None:
        future, self._future = self._future, None
        if future is not None and not future.done():
            future.set_exception(exc)
        self.close()


class Http1Client:
    """Keep-alive HTTP/1.1 connections to one origin (``http`` or ``https``), at most ``limit`` at once."""

    def __init__(self, base_url: str, headers: dict[str, str], *, limit: int, connect_timeout_s: float) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        # One context for the client's life: building one per connection costs more than the handshake.
        self._ssl = ssl.create_default_context() if parts.scheme == "https" else None
        default_port = (parts.scheme == "https" and self._port == 443) or (parts.scheme == "http" and self._port == 80)
        host_header = parts.netloc.rsplit("@", 1)[-1] if not default_port else self._host
        if ":" in self._host and not host_header.startswith("["):  # an IPv6 literal
            host_header = f"[{self._host}]"
        lines = [f"Host: {host_header}"] + [f"{k}: {v}" for k, v in headers.items()]
        for line in lines:
            if "\r" in line or "\n" in line:
                raise ValueError("header names and values must not contain line breaks")
        self._head = "".join(line + "\r\n" for line in lines).encode("latin-1")
        self._limit = asyncio.Semaphore(limit)
        self._idle: deque[_Connection] = deque()
        self._connect_timeout = connect_timeout_s
        self._closed = False

    async def request(self, method: str, target: str, body: bytes | None, timeout_s: float) -> Answer:
        """Send one request for ``target`` (a path and query) and return the whole answer.

        The whole exchange, including waiting for a connection and connecting, is bounded by
        ``timeout_s`` (``TimeoutError``); connecting alone by the client's connect timeout
        (:class:`ConnectFailed`). A request written on a reused connection that the server had
        already closed, before any byte of an answer, is sent once more on a fresh connection.
        """
        loop = asyncio.get_running_loop()
        head = f"{method} {target} HTTP/1.1\r\n".encode("latin-1") + self._head
        payload = head + (b"Content-Length: %d\r\n\r\n" % len(body) + body if body is not None else b"\r\n")
        current = asyncio.current_task()
        assert current is not None
        timed_out = False

        def expire() -> None:
            nonlocal timed_out
            timed_out = True
            current.cancel()

        timer = loop.call_later(timeout_s, expire)
        try:
            async with self._limit:
                while True:
                    conn, reused = await self._acquire(loop)
                    future: asyncio.Future[Answer] = loop.create_future()
                    conn.send(payload, future)
                    try:
                        answer = await future
                    except Disconnected:
                        conn.close()
                        if reused and conn.answered_nothing:
                            continue  # a stale keep-alive connection: nothing reached the server's application
                        raise
                    except BaseException:
                        conn.close()
                        raise
                    if conn.reusable and not conn.closed and not self._closed:
                        self._idle.append(conn)
                    else:
                        conn.close()
                    return answer
        except asyncio.CancelledError:
            if timed_out:
                current.uncancel()
                raise TimeoutError(f"no complete answer within {timeout_s:g}s") from None
            raise
        finally:
            timer.cancel()

    async def _acquire(self, loop: asyncio.AbstractEventLoop) -> tuple[_Connection, bool]:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                return conn, True
        try:
            async with asyncio.timeout(self._connect_timeout):
                hostname = self._host if self._ssl else None
                _transport, conn = await loop.create_connection(
                    _Connection, self._host, self._port, ssl=self._ssl, server_hostname=hostname
                )
        except TimeoutError as exc:
            raise ConnectFailed(f"connecting to {self._host}:{self._port} timed out") from exc
        except OSError as exc:
            raise ConnectFailed(f"connecting to {self._host}:{self._port} failed: {exc}") from exc
        return conn, False

    def close(self) -> None:
        """Close every idle connection; connections in use close when their request ends."""
        self._closed = True
        while self._idle:
            self._idle.pop().close()
