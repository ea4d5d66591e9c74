"""A small Inspect eval through the gateway with the stock `openai-api/airlock/...` provider."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import Lab


def test_inspect_eval_through_gateway(lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from inspect_ai import Task, eval
    from inspect_ai.dataset import Sample
    from inspect_ai.model import get_model
    from inspect_ai.scorer import includes
    from inspect_ai.solver import generate

    _gid, key = lab.grant()
    # The documented evaluator set-up: two environment variables and the stock provider.
    monkeypatch.setenv("AIRLOCK_BASE_URL", lab.url + "/v1")
    monkeypatch.setenv("AIRLOCK_API_KEY", key)
    # memoize=False: Inspect caches model clients by name, and each test has its own server.
    model = get_model("openai-api/airlock/m1/helpful-only", memoize=False)
    task = Task(
        dataset=[
            Sample(input="alpha beta", target="alpha"),
            Sample(input="gamma delta", target="gamma"),
            Sample(input="epsilon", target="omega"),
        ],
        solver=generate(),
        scorer=includes(),
    )
    (log,) = eval(
        task,
        model=model,
        log_dir=str(tmp_path / "logs"),
        display="none",
        max_retries=0,
    )
    assert log.status == "success", log.error.traceback if log.error else None
    assert log.results is not None
    accuracy = log.results.scores[0].metrics["accuracy"].value
    assert accuracy == pytest.approx(2 / 3)
    rows = [r for r in lab.audit_rows() if r.path == "/v1/chat/completions"]
    assert len(rows) == 3 and all(r.outcome == "allowed" and r.variant == "helpful-only" for r in rows)
