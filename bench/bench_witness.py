"""Witness cosigning overhead and Model Report cost.

1. Cosigning: three local witness processes (``airlock witness serve``). Each round records 50
   events and signs a checkpoint (the baseline: what a checkpoint costs without witnesses), then
   asks the three witnesses in parallel (``cosign_newest``: consistency proof, HTTP, their
   verification and fsync, our verification and store). Goal: the added time <= 50 ms.
2. Model Report: a version with 10^4 ledger entries (grants, attested results, gate decisions).
   Generation (``build_model_report``) and offline verification (``verify_model_report``) against
   the baseline of verifying the whole bundle offline (``verify_bundle``). Goal: <= 5 s each.

    python bench/bench_witness.py [--rounds 7] [--entries 10000]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

import httpx  # noqa: E402

from _common import report, spread  # noqa: E402
from airlock.config import Settings  # noqa: E402
from airlock.db import Database  # noqa: E402
from airlock.ledger import service  # noqa: E402
from airlock.ledger._cosig import WitnessVerifier  # noqa: E402
from airlock.ledger.cosign import Endpoint, cosign_newest  # noqa: E402
from airlock.ledger.model_report import verify_model_report  # noqa: E402
from airlock.ledger.reporting import build_model_report  # noqa: E402
from airlock.ledger.verify import verify_bundle  # noqa: E402

VERSION = {"model": "m1", "label": "v1", "hash": "ab" * 32}


def _stats(values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return f"min {min(ms):8.1f} ms  median {statistics.median(ms):8.1f} ms  max {max(ms):8.1f} ms"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_witnesses(root: Path, lab_vkey: str, n: int) -> list[tuple[subprocess.Popen[bytes], str]]:
    """Start ``n`` witness processes; return them with their URLs once each answers."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    procs = []
    for i in range(n):
        port = _port()
        args = ["witness", "serve", "--store", str(root / f"w{i}"), "--name", f"bench.example/w{i}"]
        args += ["--log", lab_vkey, "--port", str(port)]
        proc = subprocess.Popen([sys.executable, "-m", "airlock", *args], env=env, stderr=subprocess.DEVNULL)
        procs.append((proc, f"http://127.0.0.1:{port}"))
    for proc, url in procs:
        deadline = time.monotonic() + 120
        while True:
            try:
                httpx.get(url + "/pubkey", timeout=1)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"witness at {url} did not start") from None
                time.sleep(0.1)
    return procs


def bench_cosign(tmp: Path, rounds: int) -> None:
    db = Database(f"sqlite:///{tmp / 'cosign.db'}")
    db.migrate()
    settings = Settings(home=tmp / "home")
    signer = service.get_signer(settings)
    procs = start_witnesses(tmp, signer.verifier.vkey(), 3)
    try:
        endpoints = [Endpoint(url, WitnessVerifier.parse(httpx.get(url + "/pubkey").text.strip())) for _p, url in procs]
        base, added = [], []
        known: dict[str, int] = {}
        pool = ThreadPoolExecutor(max_workers=3)
        with httpx.Client(timeout=5) as client:
            for r in range(rounds + 1):
                with db.session() as session:
                    for i in range(50):
                        service.record_event(session, "bench.event", {"round": r, "i": i})
                t0 = time.perf_counter()
                service.publish_checkpoint(db, signer)
                t1 = time.perf_counter()
                outcome = cosign_newest(db, endpoints, client=client, pool=pool, known=known)
                t2 = time.perf_counter()
                assert len(outcome.cosigned) == 3, outcome.failed
                if r:  # the first round warms connections and the witnesses' first write
                    base.append(t1 - t0)
                    added.append(t2 - t1)
        print(f"checkpoint without witnesses:           {_stats(base)}")
        print(f"added by cosigning with 3 witnesses:    {_stats(added)}")
        print(f"ratio added/baseline (median):          {statistics.median(added) / statistics.median(base):.2f}x")
        ms = [a * 1e3 for a in added]
        report("witness", [{"figure": "cosigning with 3 witnesses, added (ms)", "value": spread(ms, "{:.1f}")}])
    finally:
        for proc, _url in procs:
            proc.terminate()
            proc.wait(timeout=30)
        db.dispose()


def bench_report(tmp: Path, entries: int, rounds: int) -> None:
    db = Database(f"sqlite:///{tmp / 'report.db'}")
    db.migrate()
    settings = Settings(home=tmp / "home", ledger_witnesses=[])
    signer = service.get_signer(settings)
    grants = max(1, entries // 10)
    with db.session() as session:
        for g in range(grants):
            body = {
                "grant": f"grt_{g}",
                "evaluator": f"org-{g % 7}",
                "model": "m1",
                "versions": [VERSION],
                "variants": ["helpful-only"],
                "scopes": ["sampling"],
                "not_before": None,
                "not_after": None,
                "embargo_days": 30,
            }
            service.record_event(session, "grant.issued", body, confidential={"quotas": {"total_tokens": g}})
        for i in range(entries - grants - 1):
            metrics = {"mean_score": {"value": (i % 100) / 100, "ci95": [0.0, 1.0], "n": 40, "method": "wilson"}}
            attested = {
                "result": f"res_{i}",
                "grant": f"grt_{i % grants}",
                "evaluator": f"org-{i % 7}",
                "version": VERSION,
                "variant": "helpful-only",
                "suite": "knowledge_proxy",
                "task": "knowledge_proxy",
                "samples": 40,
                "fine_tuned": False,
                "log_sha256": "11" * 32,
                "embargoed": False,
                "metrics": metrics,
            }
            service.record_event(session, "eval.attested", attested)
        service.record_event(session, "stage.changed", {"version": VERSION, "from": "internal", "to": "deployed"})
    service.publish_checkpoint(db, signer)
    key = signer.verifier.vkey()
    bundle = service.export_bundle(db, signer)
    gen, ver, base = [], [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        report = build_model_report(db, settings, "m1", "v1")
        t1 = time.perf_counter()
        problems = verify_model_report(report, key)
        t2 = time.perf_counter()
        assert not problems, problems[:3]
        assert verify_bundle(bundle, key).ok
        t3 = time.perf_counter()
        gen.append(t1 - t0)
        ver.append(t2 - t1)
        base.append(t3 - t2)
    print(f"Model Report over {len(report['entries'])} cited entries, {len(report['statements'])} statements:")
    print(f"  generate:                             {_stats(gen)}")
    print(f"  verify offline:                       {_stats(ver)}")
    print(f"  baseline, verify the whole bundle:    {_stats(base)}")
    ratio = [b / v for b, v in zip(base, ver, strict=True)]
    report("witness", [{"figure": "model report verify, whole bundle / offline (x)", "value": spread(ratio, "{:.1f}")}])
    db.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--entries", type=int, default=10_000)
    parser.add_argument("--only", choices=["cosign", "report"], help="run one of the two benchmarks")
    parser.add_argument("--quick", action="store_true", help="3 rounds over 1,000 entries (< 2 min)")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.entries = 3, 1_000
    with tempfile.TemporaryDirectory() as tmp:
        if args.only != "report":
            bench_cosign(Path(tmp), args.rounds)
        if args.only != "cosign":
            bench_report(Path(tmp), args.entries, max(3, args.rounds // 2))


if __name__ == "__main__":
    main()
