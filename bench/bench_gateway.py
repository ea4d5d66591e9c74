"""Gateway overhead: the same requests sent to a backend directly and through Airlock over HTTP.

Both paths run in this process, at the same concurrency. The default `fake` backend answers
instantly, so the difference is the gateway's own cost (HTTP, auth, authorization, audit);
`--model tiny-random` adds a real (tiny) transformers forward pass.

    python bench/bench_gateway.py [--requests 400] [--concurrency 1,8,32] [--model fake|tiny-random]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import aiohttp  # noqa: E402
import uvicorn  # noqa: E402

from airlock.backends.base import ModelBackend, create_backend  # noqa: E402
from airlock.backends.protocol import ChatCompletionRequest  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run_load(call: Any, n: int, concurrency: int) -> tuple[list[float], float]:
    latencies: list[float] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)

    async def worker() -> None:
        while not queue.empty():
            i = queue.get_nowait()
            t0 = time.perf_counter()
            await call(i)
            latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - start


def body(i: int, model: str) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": f"request {i} hello"}],
        "max_tokens": 8,
        "temperature": 0,
    }


class Server:
    def __init__(self, app: Any) -> None:
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def setup_lab(home: Path, backend: str, model_spec: str) -> tuple[Any, str]:
    os.environ["AIRLOCK_HOME"] = str(home)
    from airlock.access import service
    from airlock.app import create_app
    from airlock.config import get_settings, reset_settings
    from airlock.db import Database
    from airlock.registry.service import parse_manifest, sync_manifest

    reset_settings()
    settings = get_settings()
    db = Database(settings.db_url)
    db.migrate()
    config = {"model": model_spec} if backend == "local" else {}
    manifest = {
        "models": [
            {
                "name": "bench",
                "versions": [
                    {
                        "label": "v1",
                        "content_hash": "0" * 64,
                        "variants": [{"name": "helpful-only", "backend": backend, "backend_config": config}],
                    }
                ],
            }
        ]
    }
    with db.session() as session:
        sync_manifest(session, parse_manifest(manifest))
        service.create_evaluator(session, "bench-org")
        grant = service.create_grant(
            session,
            service.GrantRequest(evaluator="bench-org", model="bench", variants=["helpful-only"], scopes=["sample"]),
        )
        _key, token = service.create_api_key(session, grant.id)
    return create_app(settings, db=db, sync_manifest=False), token


async def measure(backend: ModelBackend, url: str, key: str, n: int, concurrency: int) -> dict[str, Any]:
    async def direct(i: int) -> None:
        await backend.chat(ChatCompletionRequest.model_validate(body(i, "bench/helpful-only")))

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, headers={"Authorization": f"Bearer {key}"}) as http:

        async def via_gateway(i: int) -> None:
            async with http.post(url + "/v1/chat/completions", json=body(i, "bench/helpful-only")) as resp:
                assert resp.status == 200, await resp.text()
                await resp.read()

        await run_load(via_gateway, min(20, n), concurrency)  # warm-up: backend start, pools
        await run_load(direct, min(20, n), concurrency)
        d_lat, d_wall = await run_load(direct, n, concurrency)
        g_lat, g_wall = await run_load(via_gateway, n, concurrency)
    return {
        "direct_p50": percentile(d_lat, 0.5),
        "direct_p95": percentile(d_lat, 0.95),
        "direct_rps": n / d_wall,
        "gw_p50": percentile(g_lat, 0.5),
        "gw_p95": percentile(g_lat, 0.95),
        "gw_rps": n / g_wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--model", default="fake", help="fake (no model) or tiny-random (local backend)")
    args = parser.parse_args()
    backend_kind = "fake" if args.model == "fake" else "local"
    if backend_kind == "fake":
        from tests.fakes import register_fake_backend

        register_fake_backend()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("AIRLOCK_MODEL_CACHE", str(REPO / ".cache" / "models"))
        app, key = setup_lab(Path(tmp), backend_kind, args.model)
        direct_backend = create_backend(backend_kind, {"model": args.model} if backend_kind == "local" else {})
        with Server(app) as url:
            print(f"gateway overhead, backend={args.model}, {args.requests} requests per run")
            print(
                f"{'conc':>4} | {'direct p50':>10} {'p95':>8} {'req/s':>8} | {'gateway p50':>11} {'p95':>8} "
                f"{'req/s':>8} | {'+p50 ms':>7} {'thru ratio':>10}"
            )

            async def go() -> None:
                await direct_backend.start()
                try:
                    for c in (int(x) for x in args.concurrency.split(",")):
                        r = await measure(direct_backend, url, key, args.requests, c)
                        print(
                            f"{c:>4} | {r['direct_p50'] * 1e3:>8.2f}ms {r['direct_p95'] * 1e3:>6.2f}ms "
                            f"{r['direct_rps']:>8.0f} | {r['gw_p50'] * 1e3:>9.2f}ms {r['gw_p95'] * 1e3:>6.2f}ms "
                            f"{r['gw_rps']:>8.0f} | {(r['gw_p50'] - r['direct_p50']) * 1e3:>7.2f} "
                            f"{r['gw_rps'] / r['direct_rps']:>10.3f}"
                        )
                finally:
                    await direct_backend.aclose()

            asyncio.run(go())


if __name__ == "__main__":
    main()
