"""Scores that are not numbers: excluded from the metric with a count, NaN reported metrics become null."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from airlock.canonical import canonical_bytes
from airlock.evals import reporting


def _log(values: list[Any], reported: float) -> Any:
    samples = [
        SimpleNamespace(id=f"s{i}", epoch=1, input=f"q{i}", target="t", scores={"grader": SimpleNamespace(value=v)})
        for i, v in enumerate(values)
    ]
    metric = SimpleNamespace(value=reported)
    return SimpleNamespace(
        samples=samples,
        results=SimpleNamespace(scores=[SimpleNamespace(name="grader", metrics={"accuracy": metric})]),
        eval=SimpleNamespace(
            metadata={},
            task="model_graded_task",
            model="openai-api/airlock/m1/helpful-only",
            config=SimpleNamespace(epochs=1, limit=None),
            task_args={},
        ),
        plan=None,
        status="success",
    )


def test_nan_scores_are_excluded_and_counted_and_the_attestation_is_canonical_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import inspect_ai.log

    path = tmp_path / "run.eval"
    path.write_bytes(b"log bytes")
    monkeypatch.setattr(inspect_ai.log, "read_eval_log", lambda _p: _log([1.0, math.nan, 0.0, 1.0], math.nan))
    summary = reporting.summarize_log(path)
    assert summary.excluded == ["s1#1"]
    assert summary.reported == {"grader": {"accuracy": None}}

    provenance = {"grant_id": "grant_x", "model": "m1", "version": "v1", "version_hash": "a" * 64, "variant": "v"}
    source = {"from": "lab_lookup_at_submission", "version": "v1", "version_hash": "a" * 64, "looked_up_at": "t"}
    attestation = reporting.build_attestation(summary, provenance, "org-a", provenance_source=source)
    assert attestation["samples"] == 3
    assert attestation["excluded_samples"]["count"] == 1 and attestation["excluded_samples"]["samples"] == ["s1#1"]
    assert attestation["metrics"]["mean_score"]["value"] == pytest.approx(2 / 3)
    assert attestation["provenance_source"] == source
    canonical_bytes(attestation)  # RFC 8785 has no NaN: this raised before the rule


def test_a_log_whose_every_score_is_nan_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import inspect_ai.log

    path = tmp_path / "run.eval"
    path.write_bytes(b"log bytes")
    monkeypatch.setattr(inspect_ai.log, "read_eval_log", lambda _p: _log([math.nan, math.nan], math.nan))
    summary = reporting.summarize_log(path)
    with pytest.raises(ValueError, match="no scored samples"):
        reporting.build_attestation(summary, {}, "org-a")
