"""A small deterministic OpenAI-compatible server for testing the upstream backend.

Run: ``python upstream_server.py --key SECRET [--model upstream-model] [--port 0]``; it prints
``PORT <n>`` once listening. Replies echo the last user message (chat) or the prompt
(completions) reversed. Trigger words in that text make it misbehave:

TRIGGER_500, TRIGGER_503, TRIGGER_429, TRIGGER_400, TRIGGER_400_KEY, TRIGGER_BADJSON, TRIGGER_HANG,
TRIGGER_NOUSAGE, TRIGGER_STREAM_ERROR, TRIGGER_STREAM_HANG, TRIGGER_DROP, TRIGGER_SLOW,
TRIGGER_ODD_FINISH, and ``TRIGGER_503_ONCE:<tag>`` (503 the first time a tag is seen).

``GET /_debug/requests`` returns every request received (headers and body), and
``GET /_debug/stats`` counters such as streams the client abandoned.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from aiohttp import web

STATE: dict[str, Any] = {"requests": [], "seen_tags": set(), "abandoned_streams": 0, "attempts": {}}


def _error(
    status: int, message: str, *, param: str | None = None, headers: dict[str, str] | None = None
) -> web.Response:
    body = {"error": {"message": message, "type": "test_error", "param": param, "code": None}}
    return web.json_response(body, status=status, headers=headers)


def _words(text: str) -> int:
    return max(1, len(text.split()))


def _chat_logprobs(text: str, top: int) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": ch,
                "logprob": -0.1 * (i + 1),
                "bytes": list(ch.encode()),
                "top_logprobs": [{"token": ch, "logprob": -0.1 * (i + 1), "bytes": list(ch.encode())}][:top],
            }
            for i, ch in enumerate(text)
        ]
    }


def _completion_logprobs(text: str) -> dict[str, Any]:
    return {
        "tokens": list(text),
        "token_logprobs": [-0.1 * (i + 1) for i in range(len(text))],
        "top_logprobs": [{ch: -0.1 * (i + 1)} for i, ch in enumerate(text)],
        "text_offset": list(range(len(text))),
    }


async def _misbehave(request: web.Request, trigger_text: str) -> web.StreamResponse | None:
    """Return an error response (or hang) when ``trigger_text`` holds a trigger word."""
    if "TRIGGER_400_KEY" in trigger_text:
        presented = request.headers.get("Authorization", "").removeprefix("Bearer ")
        return _error(400, f"request from key {presented} is malformed")
    if "TRIGGER_HANG" in trigger_text:
        await asyncio.sleep(3600)
    if "TRIGGER_500" in trigger_text:
        return _error(500, "Traceback (most recent call last): internal secret detail")
    if "TRIGGER_503_ONCE:" in trigger_text:
        tag = trigger_text.split("TRIGGER_503_ONCE:", 1)[1].split()[0]
        STATE["attempts"][tag] = STATE["attempts"].get(tag, 0) + 1
        if tag not in STATE["seen_tags"]:
            STATE["seen_tags"].add(tag)
            return _error(503, "warming up", headers={"Retry-After": "0"})
        return None
    if "TRIGGER_503" in trigger_text:
        STATE["attempts"]["503"] = STATE["attempts"].get("503", 0) + 1
        return _error(503, "overloaded", headers={"Retry-After": "0"})
    if "TRIGGER_429" in trigger_text:
        return _error(429, "Rate limit reached for upstream-model", headers={"Retry-After": "7"})
    if "TRIGGER_400" in trigger_text:
        return _error(400, "This model's maximum context length is 8 tokens.", param="messages")
    if "TRIGGER_BADJSON" in trigger_text:
        return web.Response(status=200, text="{this is not json", content_type="application/json")
    return None


async def _authorize(request: web.Request) -> tuple[dict[str, Any] | None, web.StreamResponse | None]:
    raw = await request.read()
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    STATE["requests"].append({"path": request.path, "headers": dict(request.headers), "body": body})
    expected = f"Bearer {request.app['key']}"
    got = request.headers.get("Authorization", "")
    if got != expected:
        # Real providers echo part of the presented key; the client must not pass this on.
        return None, _error(401, f"Incorrect API key provided: {got.removeprefix('Bearer ')}")
    if not isinstance(body, dict):
        return None, _error(400, "body must be a JSON object")
    if body.get("model") != request.app["model"]:
        return None, _error(404, f"The model `{body.get('model')}` does not exist.")
    return body, None


async def _sse(request: web.Request, events: list[dict[str, Any]], trigger_text: str) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    try:
        await response.write(b": keep-alive comment\n\n")
        for i, event in enumerate(events):
            if "TRIGGER_SLOW" in trigger_text:
                await asyncio.sleep(0.05)
            await response.write(f"data: {json.dumps(event)}\n\n".encode())
            if i == 0 and "TRIGGER_STREAM_HANG" in trigger_text:
                await asyncio.sleep(3600)
            if i == 0 and "TRIGGER_STREAM_ERROR" in trigger_text:
                await response.write(b'data: {"error": {"message": "engine crashed"}}\n\n')
                return response
            if i == 0 and "TRIGGER_DROP" in trigger_text:
                assert request.transport is not None
                request.transport.close()
                return response
        await response.write(b"data: [DONE]\n\n")
    except (ConnectionResetError, asyncio.CancelledError):
        STATE["abandoned_streams"] += 1
        raise
    return response


async def chat(request: web.Request) -> web.StreamResponse:
    body, failure = await _authorize(request)
    if failure is not None:
        return failure
    assert body is not None
    messages = body.get("messages") or []
    last_user = next((m.get("content") or "" for m in reversed(messages) if m.get("role") == "user"), "")
    if isinstance(last_user, list):
        last_user = "".join(p.get("text", "") for p in last_user)
    misbehaviour = await _misbehave(request, last_user)
    if misbehaviour is not None:
        return misbehaviour
    reply = last_user[::-1]
    n = int(body.get("n", 1))
    finish = "eos_token" if "TRIGGER_ODD_FINISH" in last_user else "stop"
    prompt_tokens = sum(_words(str(m.get("content") or "")) for m in messages)
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": _words(reply) * n}
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    want_logprobs = bool(body.get("logprobs"))
    top = int(body.get("top_logprobs") or 0)
    cid, created = f"chatcmpl-test{len(STATE['requests'])}", int(time.time())
    if not body.get("stream"):
        response: dict[str, Any] = {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": body["model"],
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": reply},
                    "finish_reason": finish,
                    "logprobs": _chat_logprobs(reply, top) if want_logprobs else None,
                }
                for i in range(n)
            ],
        }
        if "TRIGGER_NOUSAGE" not in last_user:
            response["usage"] = usage
        return web.json_response(response)
    events: list[dict[str, Any]] = []
    base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": body["model"]}
    pieces = [reply[i : i + 4] for i in range(0, len(reply), 4)] or [""]
    for i in range(n):
        events.append({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}}]})
        for piece in pieces:
            choice: dict[str, Any] = {"index": i, "delta": {"content": piece}, "finish_reason": None}
            if want_logprobs:
                choice["logprobs"] = _chat_logprobs(piece, top)
            events.append({**base, "choices": [choice], "usage": None})
        events.append({**base, "choices": [{"index": i, "delta": {}, "finish_reason": finish}]})
    include_usage = (body.get("stream_options") or {}).get("include_usage")
    if include_usage and "TRIGGER_NOUSAGE" not in last_user:
        events.append({**base, "choices": [], "usage": usage})
    return await _sse(request, events, last_user)


async def completions(request: web.Request) -> web.StreamResponse:
    body, failure = await _authorize(request)
    if failure is not None:
        return failure
    assert body is not None
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else [str(p) for p in prompt or []]
    joined = " ".join(prompts)
    misbehaviour = await _misbehave(request, joined)
    if misbehaviour is not None:
        return misbehaviour
    n = int(body.get("n", 1))
    want_logprobs = body.get("logprobs") is not None
    replies = [p[::-1] for p in prompts for _ in range(n)]
    usage = {"prompt_tokens": sum(_words(p) for p in prompts), "completion_tokens": sum(_words(r) for r in replies)}
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    cid, created = f"cmpl-test{len(STATE['requests'])}", int(time.time())
    base = {"id": cid, "object": "text_completion", "created": created, "model": body["model"]}
    if not body.get("stream"):
        response: dict[str, Any] = {
            **base,
            "choices": [
                {
                    "index": i,
                    "text": (prompts[i // n] if body.get("echo") else "") + reply,
                    "finish_reason": "length",
                    "logprobs": _completion_logprobs(reply) if want_logprobs else None,
                }
                for i, reply in enumerate(replies)
            ],
        }
        if "TRIGGER_NOUSAGE" not in joined:
            response["usage"] = usage
        return web.json_response(response)
    events: list[dict[str, Any]] = []
    for i, reply in enumerate(replies):
        for start in range(0, len(reply), 4):
            events.append({**base, "choices": [{"index": i, "text": reply[start : start + 4], "finish_reason": None}]})
        events.append({**base, "choices": [{"index": i, "text": "", "finish_reason": "length"}]})
    if (body.get("stream_options") or {}).get("include_usage") and "TRIGGER_NOUSAGE" not in joined:
        events.append({**base, "choices": [], "usage": usage})
    return await _sse(request, events, joined)


async def debug_requests(request: web.Request) -> web.Response:
    return web.json_response(STATE["requests"])


async def debug_stats(request: web.Request) -> web.Response:
    return web.json_response({"abandoned_streams": STATE["abandoned_streams"], "attempts": STATE["attempts"]})


async def debug_reset(request: web.Request) -> web.Response:
    STATE["requests"].clear()
    return web.json_response({"ok": True})


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--key", required=True, help="API key clients must present")
    parser.add_argument("--model", default="upstream-model", help="the one model id served")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    args = parser.parse_args()
    app = web.Application()
    app["key"], app["model"] = args.key, args.model
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/_debug/requests", debug_requests)
    app.router.add_get("/_debug/stats", debug_stats)
    app.router.add_post("/_debug/reset", debug_reset)
    # Cancel a handler when its client goes away, like production servers do.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", args.port)
    await site.start()
    port = runner.addresses[0][1]
    print(f"PORT {port}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
