"""Gateway cost: the same chat requests sent to an instant upstream directly and through Airlock, interleaved.

The upstream (bench/instant_upstream.py), the gateway (`airlock serve`) and the closed-loop load
generator (bench/loadgen.py) are three processes. For each number of clients the direct run and
the run through Airlock alternate, repeated; each row gives min/median/max over the repeats of
the throughput ratio (through / direct), p50 and p99 latencies, and the gateway's CPU per
request (user+system time of the gateway's processes over the requests they served). The
gateway runs with the in-process limiter on SQLite, and with the Redis limiter on PostgreSQL
(the grant has a requests/min quota high enough never to refuse). `--replicas` adds requests/s
through two `airlock serve` replicas on one PostgreSQL and Redis against one.

    python bench/bench_gateway.py [--quick] [--clients 1,4,16,32,64] [--repeats 3] [--workers 1]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import loadavg, report, spread, tree_cpu_seconds
from _gateway import MODEL, REDIS_URL, REPO, database, instant_upstream, prepare_lab, serve

LOADGEN = str(REPO / "bench" / "loadgen.py")


def load(url: str, key: str, clients: int, duration: float) -> dict[str, Any]:
    """Run the load generator in its own process against ``url`` (comma-separated for several)."""
    cmd = [sys.executable, LOADGEN, "--url", url, "--key", key, "--model", MODEL, "--clients", str(clients)]
    out = subprocess.run([*cmd, "--duration", str(duration)], capture_output=True, text=True, check=True)
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def gateway_rows(args: argparse.Namespace, db_kind: str, redis: bool) -> list[dict[str, Any]]:
    """Measure one configuration; return one row per client count."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        upstream, _up_pid = stack.enter_context(instant_upstream())
        db_url = stack.enter_context(database(db_kind, Path(tmp)))
        lab = prepare_lab(
            Path(tmp) / "home",
            db_url,
            upstream,
            redis_url=REDIS_URL if redis else None,
            requests_per_minute=10**9 if redis else None,
        )
        gateway, pid = stack.enter_context(serve(lab, workers=args.workers))
        direct_url, through_url = upstream + "/chat/completions", gateway + "/v1/chat/completions"
        load(through_url, lab.key, 4, 1.0)  # warm-up: backend session, pools, caches
        for clients in args.clients:
            ratios, cpu, d_p50, g_p50, d_p99, g_p99, d_rps, g_rps = ([] for _ in range(8))
            for _ in range(args.repeats):
                direct = load(direct_url, "", clients, args.duration)
                before = tree_cpu_seconds(pid)
                through = load(through_url, lab.key, clients, args.duration)
                used = tree_cpu_seconds(pid) - before
                bad = {k: v for k, v in through["statuses"].items() if k != "200"}
                if bad:
                    raise RuntimeError(f"gateway answered errors: {bad}")
                ratios.append(through["rps"] / direct["rps"])
                cpu.append(used / through["requests"] * 1000)
                d_rps.append(direct["rps"])
                g_rps.append(through["rps"])
                d_p50.append(direct["p50_ms"])
                g_p50.append(through["p50_ms"])
                d_p99.append(direct["p99_ms"])
                g_p99.append(through["p99_ms"])
            row = {
                "config": f"{db_kind}{'+redis' if redis else ''} w={args.workers}",
                "clients": clients,
                "ratio": ratios,
                "cpu_ms": cpu,
                "direct_rps": d_rps,
                "airlock_rps": g_rps,
                "direct_p50": d_p50,
                "airlock_p50": g_p50,
                "direct_p99": d_p99,
                "airlock_p99": g_p99,
                "load": loadavg(),
            }
            print_row(row)
            rows.append(row)
    return rows


def print_row(row: dict[str, Any]) -> None:
    """Print one measured row (min/median/max over the repeats)."""
    print(
        f"{row['config']:<18} c={row['clients']:<3} thru/direct {spread(row['ratio'], '{:.2f}'):<16} "
        f"gw CPU/req {spread(row['cpu_ms'], '{:.3f}'):<20} ms  "
        f"req/s {spread(row['airlock_rps'], '{:.0f}')} vs {spread(row['direct_rps'], '{:.0f}')}  "
        f"p50 {spread(row['airlock_p50'], '{:.2f}')} vs {spread(row['direct_p50'], '{:.2f}')} ms  "
        f"p99 {spread(row['airlock_p99'], '{:.2f}')} ms  load {row['load']}",
        flush=True,
    )


def replica_rows(args: argparse.Namespace) -> dict[str, Any]:
    """Requests/s through two replicas on one PostgreSQL and Redis vs one replica, interleaved."""
    clients = max(args.clients)
    one, two = [], []
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        upstream, _pid = stack.enter_context(instant_upstream())
        db_url = stack.enter_context(database("postgresql", Path(tmp)))
        lab = prepare_lab(Path(tmp) / "home", db_url, upstream, redis_url=REDIS_URL, requests_per_minute=10**9)
        first, _ = stack.enter_context(serve(lab))
        second, _ = stack.enter_context(serve(lab))
        urls = [first + "/v1/chat/completions", second + "/v1/chat/completions"]
        load(",".join(urls), lab.key, 4, 1.0)
        for _ in range(args.repeats):
            one.append(load(urls[0], lab.key, clients, args.duration)["rps"])
            two.append(load(",".join(urls), lab.key, clients, args.duration)["rps"])
    ratios = [b / a for a, b in zip(one, two, strict=True)]
    row = {"clients": clients, "one": one, "two": two, "ratio": ratios, "load": loadavg()}
    print(
        f"replicas c={clients}: 2 vs 1 {spread(ratios, '{:.2f}')}x  "
        f"(req/s {spread(two, '{:.0f}')} vs {spread(one, '{:.0f}')})  load {row['load']}",
        flush=True,
    )
    return row


def main() -> None:
    """Run the configurations and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer clients and shorter runs (under 2 minutes)")
    parser.add_argument("--clients", default="1,4,16,32,64")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per run")
    parser.add_argument("--workers", type=int, default=1, help="gateway processes (airlock serve --workers)")
    parser.add_argument("--no-postgres", action="store_true", help="SQLite only")
    parser.add_argument("--replicas", action="store_true", help="also measure 2 replicas vs 1")
    args = parser.parse_args()
    if args.quick:
        args.clients, args.duration = "1,16", 1.5
    args.clients = [int(c) for c in str(args.clients).split(",")]
    print(f"gateway cost vs an instant upstream; {args.repeats} repeats of {args.duration:g}s, min/median/max")
    configs = [("sqlite", args.workers > 1)] + ([] if args.no_postgres else [("postgresql", True)])
    rows = []
    for db_kind, redis in configs:
        rows += gateway_rows(args, db_kind, redis)
    figures = []
    for row in rows:
        figures.append(
            {
                "figure": f"gateway CPU per request, {row['config']}, c={row['clients']}",
                "value": spread(row["cpu_ms"], "{:.3f}") + " ms",
                "goal": "<= 0.5 ms",
                "load": row["load"],
            }
        )
        figures.append(
            {
                "figure": f"throughput through/direct, {row['config']}, c={row['clients']}",
                "value": spread(row["ratio"], "{:.2f}"),
                "goal": ">= 0.95 (enough workers)",
                "load": row["load"],
            }
        )
    if args.replicas:
        rep = replica_rows(args)
        figures.append(
            {
                "figure": f"requests/s, 2 replicas vs 1, c={rep['clients']}",
                "value": spread(rep["ratio"], "{:.2f}") + "x",
                "goal": ">= 1.8x",
                "load": rep["load"],
            }
        )
    report("gateway", figures)


if __name__ == "__main__":
    main()
