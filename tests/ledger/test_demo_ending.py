"""The demo's ending on a small ledger: two witness processes cosign, the bundle and the Model Report verify."""

from __future__ import annotations

import os
from pathlib import Path

from airlock.config import get_settings
from airlock.db import Database
from airlock.demo import witnessed_ending
from airlock.ledger import service

VERSION = {"model": "m1", "label": "v1", "hash": "ef" * 32}


def test_demo_ending_cosigns_and_verifies(airlock_env: Path) -> None:
    """The demo's last steps run against any lab with a grant on the version."""
    settings = get_settings()
    db = Database(settings.db_url)
    db.migrate()
    with db.session() as session:
        body = {
            "grant": "grt_1",
            "evaluator": "org-a",
            "model": "m1",
            "versions": [VERSION],
            "variants": ["helpful-only"],
            "scopes": ["sampling"],
            "not_before": None,
            "not_after": None,
            "embargo_days": None,
        }
        service.record_event(session, "grant.issued", body)
        service.record_event(session, "stage.changed", {"version": VERSION, "from": "internal", "to": "deployed"})
    db.dispose()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    witnessed_ending(airlock_env, env, "m1", "v1")
    section = (airlock_env / "ledger" / "model-report.md").read_text()
    assert "| org-a |" in section and "witness.evals-institute.example/w1" in section
    keys = {(airlock_env / "ledger" / f"witness{n}.vkey").read_text().split("+")[2] for n in (1, 2)}
    assert len(keys) == 2  # two witnesses, two keys of their own
