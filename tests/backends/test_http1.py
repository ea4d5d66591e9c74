"""The lean HTTP/1.1 client of upstream calls: framing, keep-alive, stale connections, failures."""

from __future__ import annotations

import asyncio
import gzip
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest

from airlock.backends import http1

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def _server(handler: Handler) -> AsyncIterator[str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()


async def _read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """Read one request; return its head and body."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head, await reader.readexactly(length)


def _client(url: str, **headers: str) -> http1.Http1Client:
    return http1.Http1Client(url, headers, limit=4, connect_timeout_s=2.0)


async def test_keep_alive_reuses_one_connection_and_sends_headers() -> None:
    connections = 0
    heads: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while True:
            try:
                head, body = await _read_request(reader)
            except asyncio.IncompleteReadError:
                break
            heads.append(head)
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Echo: a\r\nX-Echo: b\r\n\r\n%s" % (len(body), body)
            )
            await writer.drain()
        writer.close()

    async with _server(handle) as url:
        client = _client(url, Authorization="Bearer k")
        answers = [await client.request("POST", "/v1/x?y=1", b'{"n": %d}' % i, 5) for i in range(3)]
        client.close()
    assert [a.body for a in answers] == [b'{"n": 0}', b'{"n": 1}', b'{"n": 2}']
    assert answers[0].status == 200 and answers[0].headers["x-echo"] == "a, b"
    assert connections == 1
    assert heads[0].startswith(b"POST /v1/x?y=1 HTTP/1.1\r\n")
    assert b"Authorization: Bearer k\r\n" in heads[0] and b"Host: 127.0.0.1:" in heads[0]


async def test_chunked_close_delimited_and_gzip_bodies() -> None:
    answers = [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        b"HTTP/1.1 201 Created\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(gzip.compress(b"zipped"))
        + gzip.compress(b"zipped"),
        b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 2\r\nConnection: close\r\n\r\nuntil the end",
    ]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(answers.pop(0))
        await writer.drain()
        writer.close()  # each answer on its own connection; the last one's body ends with it

    async with _server(handle) as url:
        client = _client(url)
        chunked = await client.request("GET", "/", None, 5)
        zipped = await client.request("POST", "/", b"{}", 5)
        closed = await client.request("POST", "/", b"{}", 5)
        client.close()
    assert (chunked.status, chunked.body) == (200, b"abcde")
    assert (zipped.status, zipped.body) == (201, b"zipped")
    assert (closed.status, closed.body, closed.headers["retry-after"]) == (503, b"until the end", "2")


async def test_a_stale_keep_alive_connection_is_replaced() -> None:
    served = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        await _read_request(reader)
        served += 1
        # Keep-alive is announced, but the server closes right after answering (as an idle timeout would).
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    async with _server(handle) as url:
        client = _client(url)
        first = await client.request("POST", "/", b"{}", 5)
        await asyncio.sleep(0)  # the close may or may not have been seen: both must work
        second = await client.request("POST", "/", b"{}", 5)
        client.close()
    assert first.body == second.body == b"ok" and served == 2


async def test_failures_are_typed() -> None:
    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        await asyncio.sleep(30)

    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort")
        await writer.drain()
        writer.close()

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"SMTP ready\r\n\r\n")
        await writer.drain()

    async with _server(hang) as url:
        with pytest.raises(TimeoutError):
            await _client(url).request("POST", "/", b"{}", 0.2)
    async with _server(cut) as url:
        with pytest.raises(http1.Disconnected):
            await _client(url).request("POST", "/", b"{}", 5)
    async with _server(garbage) as url:
        with pytest.raises(http1.BadResponse):
            await _client(url).request("POST", "/", b"{}", 5)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(http1.ConnectFailed):
        await _client(f"http://127.0.0.1:{port}").request("POST", "/", b"{}", 5)


async def test_at_most_limit_connections_at_once() -> None:
    open_now = peak = 0
    release = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal open_now, peak
        open_now += 1
        peak = max(peak, open_now)
        while True:
            try:
                await _read_request(reader)
            except asyncio.IncompleteReadError:
                break
            await release.wait()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
        open_now -= 1
        writer.close()

    async with _server(handle) as url:
        client = _client(url)
        requests = [asyncio.create_task(client.request("POST", "/", b"{}", 5)) for _ in range(10)]
        while open_now < 4:
            await asyncio.sleep(0.01)
        release.set()
        answers = await asyncio.gather(*requests)
        client.close()
    assert peak == 4 and all(a.status == 200 for a in answers)
