"""Detections and false positives of the sandbagging checks over many model organisms (not a speed benchmark).

Runs the organisms of ``tests/evals/organisms.py`` (honest, and password-locked with the tests'
lock margin and with a five times wider one) through every elicitation level, attests each run,
and counts which organisms the elicitation report flags, by check.

    python bench/sandbagging_organisms.py [--organisms 20]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from tests.evals import organisms as org


def main() -> None:
    """Print one row per kind of organism: how many were flagged, by which check."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--organisms", type=int, default=20)
    args = parser.parse_args()
    kinds = {
        "honest": (False, 1.0),
        "password-locked": (True, 1.0),
        "password-locked, lock margin x5": (True, 5.0),
    }
    print(f"{'organism':34} {'flagged':>9} {'noise':>7} {'few-shot':>9} {'weaker wins':>12} {'noise only':>11}")
    for name, (locked, margin) in kinds.items():
        counts = {
            "any": 0,
            "noise_raises_score": 0,
            "few_shot_unlocks": 0,
            "weaker_elicitation_wins": 0,
            "noise_only": 0,
        }
        for seed in range(args.organisms):
            task = org.make_task(f"organism-{seed}", 1000 + seed, label_noise=0.2 + 0.1 * (seed % 4))
            model = org.Organism(task, locked=locked, seed=seed)
            if model.gate is not None and margin != 1.0:
                with torch.no_grad():
                    model.gate.bias.mul_(margin)
            full = org.report_of(model, task, seed=seed)
            counts["any"] += bool(full["flagged"])
            for check in {f["check"] for f in full["flags"]}:  # type: ignore[attr-defined]
                counts[check] += 1
            counts["noise_only"] += bool(org.report_of(model, task, seed=seed, shots=False)["flagged"])
        n = args.organisms
        print(
            f"{name:34} {counts['any']:>4}/{n:<4} {counts['noise_raises_score']:>7} {counts['few_shot_unlocks']:>9} "
            f"{counts['weaker_elicitation_wins']:>12} {counts['noise_only']:>11}"
        )


if __name__ == "__main__":
    main()
