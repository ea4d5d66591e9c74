"""Ledger throughput and proof cost on SQLite: appends/s, and proofs at 10^5 and 10^6 entries.

Appends are measured end to end (``record_event`` in a committed transaction, then the sequencer
integrating them) against the baseline of one event per transaction sequenced one at a time, the
way an unbatched log would append. Proofs are read from stored subtree nodes (O(log n) rows in
two queries); the baseline rehashes every leaf to build the same proof, which is what a log
without stored nodes would have to do.

    python bench/bench_ledger.py                # 10^5 and 10^6 entries (a few minutes on 2 cores)
    python bench/bench_ledger.py --sizes 100000 # quicker
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

from sqlalchemy import insert, select  # noqa: E402

from _common import report, spread  # noqa: E402
from airlock.db import Database, utcnow  # noqa: E402
from airlock.ledger import service  # noqa: E402
from airlock.ledger._entry import canonical  # noqa: E402
from airlock.ledger._merkle import (  # noqa: E402
    EMPTY_ROOT,
    MemoryTree,
    verify_consistency,
    verify_inclusion,
)
from airlock.ledger.models import (  # noqa: E402
    LedgerCheckpoint,
    LedgerCommitment,
    LedgerEntry,
    LedgerNode,
    LedgerPending,
    LedgerState,
)

TABLES = [LedgerPending, LedgerEntry, LedgerNode, LedgerState, LedgerCheckpoint, LedgerCommitment]


def fresh_db(directory: Path, name: str) -> Database:
    """A SQLite database with only the ledger tables (as migration 0006 creates them)."""
    db = Database(f"sqlite:///{directory / name}")
    from airlock.db import Base

    Base.metadata.create_all(db.engine, tables=[t.__table__ for t in TABLES])  # type: ignore[misc]
    with db.session() as session:
        session.add(LedgerState(id=1, size=0, root_hash=EMPTY_ROOT, audit_last_id=0))
    return db


def body(i: int) -> dict[str, object]:
    """A grant-sized event body."""
    return {"grant": f"grant_{i:016x}", "evaluator": "org-a", "model": "m1", "scopes": ["sample"], "i": i}


class Clock:
    """Wall and process-CPU time of a block: the machine is shared, so CPU time is the stable figure."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def _rate(label: str, n: int, wall: float, cpu: float, base: float | None = None) -> float:
    ratio = f"  ({n / cpu / base:.0f}x baseline)" if base else ""
    print(f"{label:<62} {n / wall:9,.0f}/s wall  {n / cpu:9,.0f}/s CPU{ratio}")
    return n / cpu


def bench_appends(directory: Path, n_batched: int, n_single: int) -> None:
    """Appends/s end to end (recorded, committed, integrated): batched vs one at a time."""
    db = fresh_db(directory, "single.db")
    with Clock() as single:
        for i in range(n_single):
            with db.session() as session:
                service.record_event(session, "bench.event", body(i))
            service.sequence(db, batch_size=1)
    db.dispose()

    # Services call record_event once per change; 100 changes per transaction is a busy gateway.
    db = fresh_db(directory, "calls.db")
    with Clock() as calls:
        for start in range(0, n_batched, 100):
            with db.session() as session:
                for i in range(start, min(n_batched, start + 100)):
                    service.record_event(session, "bench.event", body(i))
    with Clock() as seq_calls:
        service.sequence(db, batch_size=5000)
    db.dispose()

    # Bulk producers queue 100 events per statement with record_events.
    db = fresh_db(directory, "batched.db")
    with Clock() as batches:
        for start in range(0, n_batched, 100):
            with db.session() as session:
                events = [("bench.event", body(i), None) for i in range(start, min(n_batched, start + 100))]
                service.record_events(session, events)
    with Clock() as seq:
        service.sequence(db, batch_size=5000)
    db.dispose()

    base = _rate(
        f"baseline: 1 event per transaction, sequenced singly (n={n_single})", n_single, single.wall, single.cpu
    )
    n = n_batched
    _rate(
        "record_event x100 per transaction + sequencer", n, calls.wall + seq_calls.wall, calls.cpu + seq_calls.cpu, base
    )
    _rate("record_events(100) per transaction + sequencer", n, batches.wall + seq.wall, batches.cpu + seq.cpu, base)
    _rate("  record_event calls alone", n, calls.wall, calls.cpu)
    _rate("  record_events batches alone", n, batches.wall, batches.cpu)
    _rate("  sequencer integration alone (5000 per transaction)", n, seq.wall, seq.cpu)
    batched = n / (batches.cpu + seq.cpu)
    report("ledger", [{"figure": "ledger batched appends / one per transaction (x)", "value": f"{batched / base:.0f}"}])


def build_log(directory: Path, n: int) -> tuple[Database, float, float]:
    """Fill a log with ``n`` entries: pending rows inserted in bulk, then the real sequencer."""
    db = fresh_db(directory, f"log-{n}.db")
    now = utcnow()
    chunk = 50_000
    for start in range(0, n, chunk):
        rows = []
        for i in range(start, min(n, start + chunk)):
            eid = f"lev_{i:016x}"
            entry = {"v": 1, "id": eid, "kind": "bench.event", "time": "2026-11-25T00:00:00.000000Z", "body": body(i)}
            rows.append({"event_id": eid, "kind": "bench.event", "entry": canonical(entry), "created_at": now})
        with db.session() as session:
            session.execute(insert(LedgerPending), rows)
    with Clock() as clock:
        service.sequence(db, batch_size=10_000)
    return db, n / clock.wall, n / clock.cpu


def bench_proofs(directory: Path, n: int, samples: int, baseline: bool) -> None:
    """Inclusion/consistency proof generation and verification at ``n`` entries."""
    db, rate, cpu_rate = build_log(directory, n)
    rng = random.Random(0)
    gen, ver, cgen, cver = [], [], [], []
    with db.session() as session:
        head = service.tree_head(session)
        for _ in range(samples):
            index = rng.randrange(n)
            t0 = time.perf_counter()
            p = service.inclusion_proof(session, index, n)
            t1 = time.perf_counter()
            verify_inclusion(p.leaf_hash, index, n, p.proof, head.root)
            t2 = time.perf_counter()
            gen.append(t1 - t0)
            ver.append(t2 - t1)
            old = rng.randrange(1, n)
            t0 = time.perf_counter()
            proof = service.consistency_proof(session, old, n)
            old_root = service.root_at(session, old)
            t1 = time.perf_counter()
            verify_consistency(old, n, proof, old_root, head.root)
            t2 = time.perf_counter()
            cgen.append(t1 - t0)
            cver.append(t2 - t1)

        def ms(values: list[float]) -> str:
            p95 = sorted(values)[int(0.95 * len(values))]
            return f"median {statistics.median(values) * 1e3:7.3f} ms, p95 {p95 * 1e3:7.3f} ms"

        print(
            f"n = {n:>9,}: sequenced at {rate:,.0f}/s wall, {cpu_rate:,.0f}/s CPU; "
            f"inclusion proof length {len(p.proof)}"
        )
        print(f"  inclusion proof generation:     {ms(gen)}")
        print(f"  inclusion proof verification:   {ms(ver)}")
        print(f"  consistency proof + old root:   {ms(cgen)}")
        print(f"  consistency proof verification: {ms(cver)}")
        report(
            "ledger",
            [
                {"figure": f"ledger inclusion proof, n={n} (ms)", "value": spread([g * 1e3 for g in gen], "{:.3f}")},
                {"figure": f"ledger consistency proof, n={n} (ms)", "value": spread([g * 1e3 for g in cgen], "{:.3f}")},
            ],
        )
        if baseline:
            t0 = time.perf_counter()
            tree = MemoryTree()
            for (h,) in session.execute(select(LedgerEntry.leaf_hash).order_by(LedgerEntry.idx)):
                tree.append(h)
            tree.inclusion_proof(index, n)
            naive = time.perf_counter() - t0
            print(
                f"  baseline, rehash all leaves for one proof: {naive * 1e3:,.0f} ms "
                f"({naive / statistics.median(gen):,.0f}x the stored-node proof)"
            )
    db.dispose()


def main() -> None:
    """Run the benchmarks and print absolute figures and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--sizes", default="100000,1000000", help="comma-separated log sizes for proofs ('' skips)")
    parser.add_argument("--appends", type=int, default=50_000, help="events for the batched append figure")
    parser.add_argument("--samples", type=int, default=500, help="proofs sampled per size")
    parser.add_argument("--quick", action="store_true", help="10,000 entries, 5,000 appends, 100 proofs (< 2 min)")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.appends, args.samples = "10000", 5_000, 100
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        bench_appends(directory, args.appends, 500)
        for k, n in enumerate(int(s) for s in args.sizes.split(",") if s):
            bench_proofs(directory, n, args.samples, baseline=k == 0)


if __name__ == "__main__":
    main()
