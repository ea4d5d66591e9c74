"""lm-eval's `local-completions` log-likelihood path (echo + prompt log-probs) through the gateway."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Lab, single_variant_manifest, sqlite_lab

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "lmeval"


@pytest.fixture
def tiny_lab(tmp_path: Path) -> Iterator[Lab]:
    with sqlite_lab(tmp_path, single_variant_manifest("tiny", "tiny-random", variant="base")) as lab:
        yield lab


def test_lm_eval_loglikelihood_task(tiny_lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lm_eval
    from lm_eval.tasks import TaskManager

    from airlock.backends.weights import load_tokenizer

    _gid, key = tiny_lab.grant("lm-eval-org", model="tiny", variants=["base"], scopes=["sample", "logprobs"])
    monkeypatch.setenv("OPENAI_API_KEY", key)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    yaml_text = (FIXTURES / "airlock_tiny.yaml").read_text().replace("__DATA__", str(FIXTURES / "airlock_tiny.jsonl"))
    (tasks_dir / "airlock_tiny.yaml").write_text(yaml_text)
    tokenizer_dir = tmp_path / "tokenizer"
    load_tokenizer("tiny-random").save_pretrained(tokenizer_dir)

    results: dict[str, Any] = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={
            "model": "tiny/base",
            "base_url": tiny_lab.url + "/v1/completions",
            "tokenizer_backend": "huggingface",
            "tokenizer": str(tokenizer_dir),
            "tokenized_requests": True,
            "num_concurrent": 2,
            "max_retries": 1,
        },
        tasks=["airlock_tiny"],
        task_manager=TaskManager(include_path=str(tasks_dir)),
    )
    acc = results["results"]["airlock_tiny"]["acc,none"]
    assert 0.0 <= acc <= 1.0
    rows = [r for r in tiny_lab.audit_rows() if r.path == "/v1/completions"]
    # 4 questions x 3 choices, each one echo+logprobs request, all allowed under the logprobs scope.
    assert len(rows) >= 12 and all(r.status_code == 200 and r.scope == "sample,logprobs" for r in rows)
