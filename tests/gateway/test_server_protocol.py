"""``airlock serve``'s HTTP protocol sends each response in one write and otherwise behaves as uvicorn's."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from starlette.types import Receive, Scope, Send

from airlock.web.server import CoalescingTransport
from tests.conftest import LiveServer


class _Recorder:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> str:
        return f"info:{name}"


async def test_writes_of_one_turn_leave_together_and_close_sends_them_first() -> None:
    loop = asyncio.get_running_loop()
    raw = _Recorder()
    transport: Any = CoalescingTransport(raw, loop)  # type: ignore[arg-type]
    transport.write(b"head ")
    transport.write(b"body")
    assert raw.writes == []
    await asyncio.sleep(0)  # the turn ends
    assert raw.writes == [b"head body"]
    transport.write(b"last")
    transport.close()
    assert raw.writes == [b"head body", b"last"] and raw.closed
    assert transport.get_extra_info("peername") == "info:peername"
    await asyncio.sleep(0)
    assert raw.writes == [b"head body", b"last"]  # nothing twice


async def _app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        if scope["type"] == "lifespan":
            await receive()
            await send({"type": "lifespan.startup.complete"})
            await receive()
            await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["path"] == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        for part in (b"one ", b"two ", b"three"):
            await send({"type": "http.response.body", "body": part, "more_body": True})
            await asyncio.sleep(0.01)
        await send({"type": "http.response.body", "body": b""})
        return
    body = b'{"ok": true}'
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _exchange(sock: socket.socket, request: bytes, until: bytes) -> bytes:
    sock.sendall(request)
    answer = b""
    while until not in answer:
        chunk = sock.recv(65536)
        assert chunk, answer
        answer += chunk
    return answer


def test_keep_alive_head_and_chunked_streams_are_served_as_before() -> None:
    with LiveServer(_app) as server, socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:  # type: ignore[arg-type]
        for _ in range(3):  # one kept-alive connection
            answer = _exchange(sock, b"GET /json HTTP/1.1\r\nHost: x\r\n\r\n", b'{"ok": true}')
            assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b'\r\n\r\n{"ok": true}')
        head = _exchange(sock, b"HEAD /json HTTP/1.1\r\nHost: x\r\n\r\n", b"\r\n\r\n")
        assert b"content-length: 12" in head and head.endswith(b"\r\n\r\n")
        streamed = _exchange(sock, b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n", b"0\r\n\r\n")
        assert b"transfer-encoding: chunked" in streamed
        assert streamed.split(b"\r\n\r\n", 1)[1] == b"4\r\none \r\n4\r\ntwo \r\n5\r\nthree\r\n0\r\n\r\n"
