"""Every built-in suite end to end through the gateway and the native provider: tiny model, then SmolLM2."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from airlock.evals.suites import SUITE_MODULES, suite_dataset_hash, suite_task
from tests.conftest import Lab, single_variant_manifest, sqlite_lab

SUITE_ARGS: dict[str, dict[str, Any]] = {
    "knowledge_proxy": {"scoring": "logprobs"},
    "refusal_robustness": {},
    "cyber_ctf_lite": {},
    "autonomy_lite": {},
}


@pytest.fixture(scope="module")
def tiny_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with sqlite_lab(tmp_path_factory.mktemp("tiny"), single_variant_manifest("target", "tiny-random")) as lab:
        yield lab


@pytest.fixture(scope="module")
def smol_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    manifest = single_variant_manifest("target", "embedded:smollm2-135m")
    with sqlite_lab(tmp_path_factory.mktemp("smol"), manifest) as lab:
        yield lab


def run_suite(lab: Lab, suite: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limit: int) -> Any:
    from inspect_ai import eval
    from inspect_ai.model import get_model

    from airlock.evals.provider import provenance_from_log

    _gid, key = lab.grant("suite-org", model="target", variants=["helpful-only"], scopes=["sample", "logprobs"])
    monkeypatch.setenv("AIRLOCK_BASE_URL", lab.url + "/v1")
    monkeypatch.setenv("AIRLOCK_API_KEY", key)
    (log,) = eval(
        suite_task(suite)(**SUITE_ARGS[suite]),
        model=get_model("airlock/target/helpful-only", memoize=False),
        limit=limit,
        max_tokens=24,
        message_limit=6,
        log_dir=str(tmp_path / "logs"),
        display="none",
    )
    assert log.status == "success", log.error
    assert log.results is not None and log.results.scores
    assert log.eval.metadata and log.eval.metadata["dataset_hash"] == suite_dataset_hash(suite)
    provenance = provenance_from_log(log)["variant"]
    assert provenance["variant"] == "helpful-only" and len(provenance["version_hash"]) == 64
    return log


@pytest.mark.parametrize("suite", sorted(SUITE_MODULES))
def test_suite_on_tiny_random_model(tiny_lab: Lab, suite: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_suite(tiny_lab, suite, tmp_path, monkeypatch, limit=2)


@pytest.mark.slow
@pytest.mark.parametrize("suite", sorted(SUITE_MODULES))
def test_suite_on_smollm2(smol_lab: Lab, suite: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = run_suite(smol_lab, suite, tmp_path, monkeypatch, limit=2)
    assert all(s.output and s.output.usage for s in log.samples or [] if s.output.completion)
