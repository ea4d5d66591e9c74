"""A small Inspect eval through the gateway with the stock `openai-api/airlock/...` provider."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import Lab, eval_through_lab


def test_inspect_eval_through_gateway(lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from inspect_ai import Task
    from inspect_ai.dataset import Sample
    from inspect_ai.scorer import includes
    from inspect_ai.solver import generate

    task = Task(
        dataset=[
            Sample(input="alpha beta", target="alpha"),
            Sample(input="gamma delta", target="gamma"),
            Sample(input="epsilon", target="omega"),
        ],
        solver=generate(),
        scorer=includes(),
    )
    # The documented evaluator set-up: two environment variables and the stock provider.
    log = eval_through_lab(lab, task, tmp_path / "logs", monkeypatch)
    assert log.status == "success", log.error.traceback if log.error else None
    assert log.results is not None
    accuracy = log.results.scores[0].metrics["accuracy"].value
    assert accuracy == pytest.approx(2 / 3)
    rows = [r for r in lab.audit_rows() if r.path == "/v1/chat/completions"]
    assert len(rows) == 3 and all(r.outcome == "allowed" and r.variant == "helpful-only" for r in rows)
