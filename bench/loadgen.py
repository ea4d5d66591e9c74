"""A closed-loop HTTP load generator run as its own process: N clients, each sending its next request on an answer.

Prints one JSON object: requests, elapsed seconds, latencies (p50/p99 in ms), status counts.

    python bench/loadgen.py --url http://127.0.0.1:8000/v1/chat/completions --key K --model M \
        --clients 16 --duration 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter

import aiohttp


async def _run(args: argparse.Namespace) -> dict[str, object]:
    headers = {"Content-Type": "application/json"}
    if args.key:
        headers["Authorization"] = f"Bearer {args.key}"
    body = json.dumps(
        {"model": args.model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8, "temperature": 0}
    ).encode()
    urls = args.url.split(",")
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as http:
        # Warm every client's connection before the clock starts.
        async def one() -> None:
            async with http.post(urls[0], data=body) as resp:
                await resp.read()

        await asyncio.gather(*(one() for _ in range(args.clients)))
        stop_at = time.perf_counter() + args.duration
        remaining = [args.requests] if args.requests else None

        async def client(url: str) -> None:
            while time.perf_counter() < stop_at if remaining is None else remaining[0] > 0:
                if remaining is not None:
                    remaining[0] -= 1
                t0 = time.perf_counter()
                async with http.post(url, data=body) as resp:
                    await resp.read()
                    statuses[resp.status] += 1
                latencies.append(time.perf_counter() - t0)

        start = time.perf_counter()
        # Clients are spread over the URLs given (gateway replicas behind a round-robin balancer).
        await asyncio.gather(*(client(urls[i % len(urls)]) for i in range(args.clients)))
        elapsed = time.perf_counter() - start
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, max(0, round(q * len(latencies)) - 1))] * 1000 if latencies else 0.0

    return {
        "requests": len(latencies),
        "elapsed": elapsed,
        "rps": len(latencies) / elapsed if elapsed else 0.0,
        "p50_ms": pct(0.5),
        "p99_ms": pct(0.99),
        "statuses": {str(k): v for k, v in statuses.items()},
    }


def main() -> None:
    """Run the load and print its figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True, help="one URL, or several separated by commas")
    parser.add_argument("--key", default="")
    parser.add_argument("--model", default="instant")
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--requests", type=int, default=0, help="a fixed number of requests instead of a duration")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    print(json.dumps(asyncio.run(_run(args))))


if __name__ == "__main__":
    main()
