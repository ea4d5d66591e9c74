"""The evaluator's loop: keygen, eval run (resumable), submit signed results, list and compare."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from airlock.cli import app
from tests.conftest import Lab

TASK_FILE = Path(__file__).resolve().parents[1] / "fixtures" / "inspect_tasks" / "echo_task.py"
runner = CliRunner()


def invoke(*args: str) -> str:
    result = runner.invoke(app, list(args))
    if result.exc_info and result.exit_code != 0:
        import traceback

        traceback.print_exception(result.exc_info[1])
    assert result.exit_code == 0, result.output
    return result.output


def test_run_submit_results_compare(lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _gid, key = lab.grant("org-a", variants=["production", "helpful-only"])
    monkeypatch.setenv("AIRLOCK_BASE_URL", lab.url + "/v1")
    monkeypatch.setenv("AIRLOCK_API_KEY", key)
    assert "registered with the lab" in invoke("evaluator", "keygen", "--register")

    log_dir = tmp_path / "run"
    models = ["-m", "m1/production", "-m", "m1/helpful-only"]
    invoke("eval", "run", str(TASK_FILE), *models, "--log-dir", str(log_dir), "--display", "none")
    logs = sorted(log_dir.glob("*.eval"))
    assert len(logs) == 2
    from inspect_ai.log import read_eval_log

    for path in logs:  # the provenance is in the header: it survives --no-log-samples and header-only reads
        header = read_eval_log(str(path), header_only=True)
        record = header.eval.metadata["airlock"][header.eval.model]
        assert record["variant"]["variant"] == header.eval.model.rsplit("/", 1)[-1] and record["variant"]["grant_id"]
    requests_before = len([r for r in lab.audit_rows() if r.path == "/v1/chat/completions"])
    assert requests_before == 12
    # Re-running the same eval set finds everything done and sends nothing.
    invoke("eval", "run", str(TASK_FILE), *models, "--log-dir", str(log_dir), "--display", "none")
    assert len([r for r in lab.audit_rows() if r.path == "/v1/chat/completions"]) == requests_before

    out = invoke("eval", "submit", str(log_dir))
    assert out.count("res_") == 2
    results = json.loads(invoke("eval", "results", "--json"))
    by_variant = {r["variant"]: r for r in results}
    assert by_variant["helpful-only"]["metrics"]["mean_score"]["value"] == pytest.approx(5 / 6)
    assert by_variant["production"]["metrics"]["mean_score"]["value"] == pytest.approx(3 / 6)
    assert by_variant["production"]["task"] == "echo_task"
    assert all(len(r["log_sha256"]) == 64 for r in results)
    assert len(list(log_dir.glob("*.attestation.json"))) == 2

    # Submitting the same logs again is refused (already submitted), with a non-zero exit.
    again = runner.invoke(app, ["eval", "submit", str(log_dir)])
    assert again.exit_code == 1 and "already submitted" in again.output

    comparison = json.loads(
        invoke("eval", "compare", str(log_dir), "--a", "m1/production", "--b", "m1/helpful-only", "--json")
    )
    (comp,) = comparison
    assert comp["paired_samples"] == 6
    assert comp["difference_b_minus_a"]["value"] == pytest.approx(2 / 6)
    assert list(log_dir.glob("compare-*.png"))


def test_eval_commands_need_lab_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIRLOCK_BASE_URL", raising=False)
    monkeypatch.delenv("AIRLOCK_API_KEY", raising=False)
    result = runner.invoke(app, ["eval", "results"])
    assert result.exit_code == 1 and "AIRLOCK_BASE_URL" in result.output
