"""The HTTP server protocol ``airlock serve`` runs: uvicorn's httptools protocol, writing each response in one send.

uvicorn writes a response's status line and headers as soon as the application starts the
response, then its body in a second write: two system calls, and two TCP segments the client
wakes up for. Here writes made in one turn of the event loop are joined and sent at the end of
that turn, so a response answered at once (every JSON answer) leaves in one write; nothing is
held past the turn in which it was written, and closing the connection sends what is pending
first. Everything else is uvicorn's.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class CoalescingTransport:
    """Wraps a transport: writes made in one event-loop turn go out together at its end."""

    __slots__ = ("_loop", "_pending", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] | None = None

    def write(self, data: bytes) -> None:
        """Queue ``data``; it is sent, with whatever else this turn writes, when the turn ends."""
        if self._pending is None:
            self._pending = [data]
            self._loop.call_soon(self.flush)
        else:
            self._pending.append(data)

    def flush(self) -> None:
        """Send what is queued now."""
        pending, self._pending = self._pending, None
        if pending and not self._transport.is_closing():
            self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        """Send what is queued, then close (as the transport does with its own buffer)."""
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol over a :class:`CoalescingTransport`."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Set up the connection as uvicorn does, then route its writes through the coalescing wrapper."""
        super().connection_made(transport)
        # Flow control (pausing reads and writes) stays on the real transport, as uvicorn set it up.
        self.transport = CoalescingTransport(transport, self.loop)  # type: ignore[assignment]
