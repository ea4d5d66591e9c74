"""An OpenAI-compatible server that answers every chat/text completion at once, for gateway benchmarks.

A bare asyncio HTTP/1.1 server (keep-alive, Content-Length bodies) with a fixed answer, so its
own cost per request is a few tens of microseconds and the figure measured through a gateway is
the gateway's. Prints ``PORT <n>`` once listening.

    python bench/instant_upstream.py [--port 0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

_CHAT = json.dumps(
    {
        "id": "chatcmpl-instant",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "instant",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop", "logprobs": None}
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
    }
).encode()
_TEXT = json.dumps(
    {
        "id": "cmpl-instant",
        "object": "text_completion",
        "created": 1700000000,
        "model": "instant",
        "choices": [{"index": 0, "text": "ok", "finish_reason": "stop", "logprobs": None}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
    }
).encode()


def _response(status: str, body: bytes) -> bytes:
    head = f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


_CHAT_RESPONSE = _response("200 OK", _CHAT)
_TEXT_RESPONSE = _response("200 OK", _TEXT)
_HEALTH_RESPONSE = _response("200 OK", b"{}")
_NOT_FOUND = _response("404 Not Found", b'{"error": {"message": "not found"}}')


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            request_line, _, header_block = head.partition(b"\r\n")
            length = 0
            for line in header_block.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
            if length:
                await reader.readexactly(length)
            path = request_line.split(b" ")[1] if b" " in request_line else b"/"
            if path.endswith(b"/chat/completions"):
                writer.write(_CHAT_RESPONSE)
            elif path.endswith(b"/completions"):
                writer.write(_TEXT_RESPONSE)
            elif path.endswith(b"/health") or path.endswith(b"/models"):
                writer.write(_HEALTH_RESPONSE)
            else:
                writer.write(_NOT_FOUND)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def _main(port: int) -> None:
    server = await asyncio.start_server(_handle, "127.0.0.1", port, backlog=1024)
    print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    """Serve until killed."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    try:
        asyncio.run(_main(args.port))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
