"""A faithful fake of vLLM's OpenAI server for the endpoints Airlock uses: a real tokenizer, deterministic logits.

Run: ``python vllm_server.py --key SECRET --model served-name [--enable-tokenizer-info-endpoint]``;
it prints ``PORT <n>`` once listening. Shapes follow vLLM's source
(``vllm/entrypoints/serve/tokenize``, ``serve/lora``, ``openai/completion/protocol.py``):

- ``POST /tokenize`` (``prompt`` or ``messages``), ``POST /detokenize``, ``GET /tokenizer_info``
  (only with ``--enable-tokenizer-info-endpoint``): at the root, not under ``/v1``, and like
  vLLM's API-key middleware, only ``/v1`` paths need the key;
- ``POST /v1/load_lora_adapter`` / ``/v1/unload_lora_adapter`` (only when
  ``VLLM_ALLOW_RUNTIME_LORA_UPDATING`` is true): 200 with a plain-text success line, 400 for a
  name already loaded, 404 for an unknown one or a path without an adapter;
- ``POST /v1/completions`` with ``echo``, ``logprobs`` and ``prompt_logprobs`` (``prompt_logprobs``
  defaults to ``logprobs`` under ``echo``); the model must be the served one or a loaded adapter;
- errors as vLLM's ``ErrorResponse``: ``{"error": {"message", "type", "param", "code"}}``.

The "model" scores token ``t`` after token ``p`` with log-softmax of normal logits seeded by
``(p, model name)``: deterministic, and an adapter visibly changes the distribution.
``GET /_debug/requests`` returns what was received; ``POST /_debug/forget_adapters`` drops every
adapter (as a restart of the server would).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import web

STATE: dict[str, Any] = {"requests": [], "loras": {}}


def _error(status: int, message: str, err_type: str = "BadRequestError") -> web.Response:
    body = {"error": {"message": message, "type": err_type, "param": None, "code": status}}
    return web.json_response(body, status=status)


def _logprobs(prev: int, model: str, vocab: int) -> np.ndarray:
    rng = np.random.default_rng(zlib.crc32(f"{model}:{prev}".encode()))
    logits = rng.standard_normal(vocab) * 3.0
    return logits - np.logaddexp.reduce(logits)


@web.middleware
async def record_and_authorize(request: web.Request, handler: Any) -> web.StreamResponse:
    raw = await request.read()
    try:
        body = json.loads(raw) if raw else None
    except ValueError:
        body = raw.decode(errors="replace")
    if not request.path.startswith("/_debug"):
        STATE["requests"].append({"method": request.method, "path": request.path, "body": body})
    # vLLM's --api-key middleware guards /v1 routes only.
    if request.path.startswith("/v1") and request.headers.get("Authorization") != f"Bearer {request.app['key']}":
        return web.json_response({"error": "Unauthorized"}, status=401)
    result: web.StreamResponse = await handler(request)
    return result


def _check_model(request: web.Request, model: Any) -> web.Response | None:
    if model is None or model == request.app["model"] or model in STATE["loras"]:
        return None
    return _error(404, f"The model `{model}` does not exist.", "NotFoundError")


async def tokenize(request: web.Request) -> web.Response:
    body = await request.json()
    if (failure := _check_model(request, body.get("model"))) is not None:
        return failure
    tok = request.app["tokenizer"]
    if "messages" in body:
        text = tok.apply_chat_template(
            body["messages"], tokenize=False, add_generation_prompt=body.get("add_generation_prompt", True)
        )
        special = body.get("add_special_tokens", False)
    else:
        text, special = body["prompt"], body.get("add_special_tokens", True)
    ids = tok(text, add_special_tokens=special)["input_ids"]
    strs = tok.convert_ids_to_tokens(ids) if body.get("return_token_strs") else None
    return web.json_response({"count": len(ids), "max_model_len": 4096, "tokens": ids, "token_strs": strs})


async def detokenize(request: web.Request) -> web.Response:
    body = await request.json()
    if (failure := _check_model(request, body.get("model"))) is not None:
        return failure
    return web.json_response({"prompt": request.app["tokenizer"].decode(body["tokens"])})


async def tokenizer_info(request: web.Request) -> web.Response:
    tok = request.app["tokenizer"]
    info = {
        "tokenizer_class": type(tok).__name__,
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "pad_token": tok.pad_token,
        "model_max_length": 4096,
        "name_or_path": "/lab/secret/checkpoints/frontier-rc1",
        "chat_template": tok.chat_template,
    }
    return web.json_response(info)


async def load_lora_adapter(request: web.Request) -> web.Response:
    body = await request.json()
    name, path = body.get("lora_name"), body.get("lora_path")
    if not name or not path:
        return _error(400, "Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput")
    if name in STATE["loras"] and not body.get("load_inplace"):
        return _error(
            400,
            f"The lora adapter '{name}' has already been loaded. If you want to load the adapter in place, "
            "set 'load_inplace' to True.",
            "InvalidUserInput",
        )
    if not (Path(path) / "adapter_config.json").is_file():
        return _error(404, f"No adapter found for {path}", "NotFoundError")
    STATE["loras"][name] = path
    return web.Response(status=200, text=f"Success: LoRA adapter '{name}' added successfully.")


async def unload_lora_adapter(request: web.Request) -> web.Response:
    name = (await request.json()).get("lora_name")
    if name not in STATE["loras"]:
        return _error(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
    del STATE["loras"][name]
    return web.Response(status=200, text=f"Success: LoRA adapter '{name}' removed successfully.")


async def models(request: web.Request) -> web.Response:
    data = [{"id": request.app["model"], "object": "model", "root": request.app["model"], "parent": None}]
    data += [{"id": n, "object": "model", "root": p, "parent": request.app["model"]} for n, p in STATE["loras"].items()]
    return web.json_response({"object": "list", "data": data})


async def completions(request: web.Request) -> web.Response:
    body = await request.json()
    model = body.get("model")
    if (failure := _check_model(request, model)) is not None:
        return failure
    tok = request.app["tokenizer"]
    vocab = len(tok)
    prompt = body["prompt"]
    ids: list[int] = list(prompt) if isinstance(prompt, list) else tok(prompt)["input_ids"]
    echo, logprobs = bool(body.get("echo")), body.get("logprobs")
    prompt_logprobs = body.get("prompt_logprobs")
    if prompt_logprobs is None and echo:
        prompt_logprobs = logprobs
    if body.get("stream") and prompt_logprobs is not None and "prompt_logprobs" in body:
        return _error(400, "`prompt_logprobs` are not available when `stream=True`.")
    for value, name in ((logprobs, "logprobs"), (prompt_logprobs, "prompt_logprobs")):
        if value is not None and value > 20:
            return _error(400, f"Requested {name} of {value}, which is greater than max allowed: 20")
    max_tokens = int(body.get("max_tokens", 16))
    if echo and max_tokens == 0:
        max_tokens = 1  # vLLM samples one token and drops it (echo without generation)
        drop = True
    else:
        drop = False
    generated: list[int] = []
    gen_lp: list[float] = []
    prev = ids[-1]
    for _ in range(max_tokens):
        dist = _logprobs(prev, model, vocab)
        nxt = int(np.argmax(dist))
        generated.append(nxt)
        gen_lp.append(float(dist[nxt]))
        prev = nxt
    if drop:
        generated, gen_lp = [], []

    def top(prev_token: int, chosen: int, k: int) -> dict[str, float]:
        dist = _logprobs(prev_token, model, vocab)
        best = [int(i) for i in np.argsort(-dist)[:k]]
        return {tok.decode([i]): float(dist[i]) for i in [*best, chosen]}

    choice: dict[str, Any] = {"index": 0, "finish_reason": "length", "stop_reason": None}
    text = tok.decode(generated)
    if echo:
        text = tok.decode(ids) + text
    choice["text"] = text
    if logprobs is not None:
        tokens = (ids if echo else []) + generated
        token_lps: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        if echo:
            token_lps.append(None)
            tops.append(None)
            for i in range(1, len(ids)):
                token_lps.append(float(_logprobs(ids[i - 1], model, vocab)[ids[i]]))
                tops.append(top(ids[i - 1], ids[i], logprobs))
        previous = ids[-1]
        for t, lp in zip(generated, gen_lp, strict=True):
            token_lps.append(lp)
            tops.append(top(previous, t, logprobs))
            previous = t
        offsets, at = [], 0
        for t in tokens:
            offsets.append(at)
            at += len(tok.decode([t]))
        choice["logprobs"] = {
            "tokens": [tok.decode([t]) for t in tokens],
            "token_logprobs": token_lps,
            "top_logprobs": tops,
            "text_offset": offsets,
        }
    else:
        choice["logprobs"] = None
    if prompt_logprobs is not None:
        entries: list[dict[str, Any] | None] = [None]
        for i in range(1, len(ids)):
            dist = _logprobs(ids[i - 1], model, vocab)
            order = np.argsort(-dist)
            rank = {int(t): r + 1 for r, t in enumerate(order[: max(prompt_logprobs, 1) + 1])}
            keep = [int(t) for t in order[:prompt_logprobs]] + [ids[i]]
            entries.append(
                {
                    str(t): {
                        "logprob": float(dist[t]),
                        "rank": rank.get(t, int((dist > dist[t]).sum()) + 1),
                        "decoded_token": tok.decode([t]),
                    }
                    for t in keep
                }
            )
        choice["prompt_logprobs"] = entries
    else:
        choice["prompt_logprobs"] = None
    usage = {"prompt_tokens": len(ids), "completion_tokens": len(generated), "total_tokens": len(ids) + len(generated)}
    return web.json_response(
        {
            "id": "cmpl-fake",
            "object": "text_completion",
            "created": 0,
            "model": model,
            "choices": [choice],
            "usage": usage,
        }
    )


async def debug_requests(request: web.Request) -> web.Response:
    return web.json_response(STATE["requests"])


async def debug_forget_adapters(request: web.Request) -> web.Response:
    STATE["loras"].clear()
    return web.json_response({"ok": True})


def build_app(key: str, model: str, tokenizer_info_endpoint: bool) -> web.Application:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
    from airlock.backends import weights

    app = web.Application(middlewares=[record_and_authorize])
    app["key"], app["model"] = key, model
    app["tokenizer"] = weights.load_tokenizer("tiny-random")
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)
    if tokenizer_info_endpoint:
        app.router.add_get("/tokenizer_info", tokenizer_info)
    if os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "").lower() in ("1", "true"):
        app.router.add_post("/v1/load_lora_adapter", load_lora_adapter)
        app.router.add_post("/v1/unload_lora_adapter", unload_lora_adapter)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/_debug/requests", debug_requests)
    app.router.add_post("/_debug/forget_adapters", debug_forget_adapters)
    return app


async def _main(args: argparse.Namespace) -> None:
    runner = web.AppRunner(build_app(args.key, args.model, args.enable_tokenizer_info_endpoint))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", args.port)
    await site.start()
    server = site._server
    assert server is not None
    port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    print(f"PORT {port}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--key", required=True)
    parser.add_argument("--model", default="served-model")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--enable-tokenizer-info-endpoint", action="store_true")
    asyncio.run(_main(parser.parse_args()))
