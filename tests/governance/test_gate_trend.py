"""Evals during training: checkpoints are evaluated like any version; the trend is plotted and extrapolated."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from airlock.cli import app
from airlock.governance.policy import parse_policy
from airlock.governance.service import trend
from tests.conftest import FAKE_MANIFEST
from tests.governance.gate_helpers import POLICY, Evidence, gate, sync, write_policy

runner = CliRunner()
VARIANTS = [{"name": "production", "backend": "fake"}, {"name": "helpful-only", "backend": "fake"}]
HASHES = {"ckpt-1": "1" * 64, "ckpt-2": "2" * 64, "ckpt-3": "3" * 64}


def _checkpoints(db: Any, tmp_path: Path, *, extra: bool = False) -> Evidence:
    hashes = {**HASHES, "ckpt-4": "4" * 64} if extra else HASHES
    manifest = copy.deepcopy(FAKE_MANIFEST)
    manifest["models"][0]["versions"] += [
        {
            "label": label,
            "stage": "training-checkpoint",
            "content_hash": h,
            "variants": VARIANTS,
        }
        for label, h in hashes.items()
    ]
    manifest["models"][0]["versions"][0]["stage"] = "training-checkpoint"
    sync(db, manifest)
    evidence = Evidence(db, tmp_path, versions=["v1", *hashes])
    # Capability rises checkpoint by checkpoint, still under the early-warning line (0.6).
    for (label, h), successes in zip(HASHES.items(), (20, 35, 45), strict=True):
        evidence.submit("knowledge_proxy", successes, 100, version=label, version_hash=h, variant="helpful-only")
    return evidence


def test_trend_across_checkpoints_warns_before_the_buffer(db: Any, tmp_path: Path) -> None:
    _checkpoints(db, tmp_path)
    from airlock.registry.service import get_model

    with db.session() as session:
        data = trend(session, get_model(session, "m1"), parse_policy(POLICY))
    bio = next(s for s in data["series"] if s["domain"] == "bio")
    assert [p["version"] for p in bio["points"]] == ["v1", "ckpt-1", "ckpt-2", "ckpt-3"]
    assert [p["value"] for p in bio["points"]] == [None, 0.2, 0.35, 0.45]
    assert [p["verdict"] for p in bio["points"]] == ["cannot_rule_out", "below", "below", "below"]
    extrapolation = bio["extrapolation"]
    assert "simple extrapolation" in extrapolation["method"]
    assert abs(extrapolation["predicted_next"] - 0.583333) < 1e-5  # least squares over 3 points
    assert extrapolation["warning"] is None  # 0.58 < 0.6: not yet
    assert gate(db)["version"] == "v1"  # a checkpoint is a version like any other


def test_trend_cli_plots_png_and_warns(tmp_path: Path, airlock_env: Path) -> None:
    from airlock.config import get_settings
    from airlock.db import Database

    write_policy(airlock_env / "policy.yaml")
    local = Database(get_settings().db_url)
    local.migrate()
    evidence = _checkpoints(local, tmp_path, extra=True)
    evidence.submit("knowledge_proxy", 52, 100, version="ckpt-4", version_hash="4" * 64)
    local.dispose()
    out = tmp_path / "trend.png"
    result = runner.invoke(app, ["gate", "trend", "m1", "--out", str(out)], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "ckpt-4" in result.output and "0.520" in result.output
    # 0.20, 0.35, 0.45, 0.52: the fitted line reaches 0.645 >= the 0.6 line at the next checkpoint.
    assert "warning bio/bio-1" in result.output and "simple extrapolation" in result.output
    result = runner.invoke(app, ["gate", "trend", "m1", "--json", "--out", str(out)])
    assert result.exit_code == 0 and '"predicted_next": 0.645' in result.output
