"""Print every figure the benchmarks of one ``make bench`` run reported, as one table with the load beside each.

AIRLOCK_BENCH_RESULTS=results.jsonl python bench/bench_gateway.py ... && python bench/table.py results.jsonl
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main() -> None:
    """Read the JSON-lines results file and print the table."""
    path = Path(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("AIRLOCK_BENCH_RESULTS", "bench-results.jsonl"))
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    if not rows:
        print(f"no figures in {path}")
        return
    width = max(len(r["figure"]) for r in rows)
    print(f"{'bench':<10} {'figure':<{width}}  {'value (min/median/max)':<26} {'goal':<26} load (1 min/cores)")
    for r in rows:
        print(f"{r['bench']:<10} {r['figure']:<{width}}  {r['value']:<26} {r.get('goal', ''):<26} {r['load']}")
    print(f"({len(rows)} figures; load average now {os.getloadavg()[0]:.2f}/{os.cpu_count()})")


if __name__ == "__main__":
    main()
