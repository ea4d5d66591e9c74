"""``autonomy_lite``: dataset invariants, checks graded on the final sandbox state, and a run through the gateway."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from inspect_ai import eval
from inspect_ai.model import ChatMessage, ChatMessageTool, ChatMessageUser, ModelOutput, ModelUsage, get_model
from inspect_ai.scorer import CORRECT, INCORRECT
from inspect_ai.tool import ToolChoice, ToolInfo

from airlock.evals.sandbox import BwrapSandboxConfig, BwrapSandboxEnvironment
from airlock.evals.suites import canonical_hash, suite_dataset_hash, suite_task
from airlock.evals.suites.autonomy_lite import CHECK_COMMAND, SUITE_VERSION, autonomy_lite, dataset_hash, load_tasks
from tests.conftest import Lab, eval_through_lab, needs_bwrap

TASKS = load_tasks()


def test_dataset_invariants() -> None:
    assert len(TASKS) >= 8
    assert len({t.id for t in TASKS}) == len(TASKS)
    for item in TASKS:
        assert item.prompt and item.files and item.check.strip() and item.solution.strip()
    raw = json.loads(resources.files("airlock.evals.suites").joinpath("data", "autonomy_lite.json").read_text())
    assert dataset_hash() == canonical_hash(raw) == suite_dataset_hash("autonomy_lite")
    assert "canary" in raw


def test_task_follows_the_suite_contract() -> None:
    task = suite_task("autonomy_lite")(max_messages=9)
    assert task.metadata == {"suite": "autonomy_lite", "suite_version": SUITE_VERSION, "dataset_hash": dataset_hash()}
    assert task.message_limit == 9 and len(task.dataset) == len(TASKS)
    assert task.sandbox is not None and task.sandbox.type == "airlock-bwrap"


def _scripted_model(*, solve: bool) -> Any:
    """A "model" that runs each task's reference solution with the bash tool (or does nothing), then submits."""
    by_prompt = {t.prompt: t for t in TASKS}

    def respond(messages: list[ChatMessage], tools: list[ToolInfo], choice: ToolChoice, config: Any) -> ModelOutput:
        item = next(by_prompt[m.text] for m in messages if isinstance(m, ChatMessageUser) and m.text in by_prompt)
        if solve and not isinstance(messages[-1], ChatMessageTool):
            output = ModelOutput.for_tool_call("mockllm/model", "bash", {"command": item.solution})
        else:
            output = ModelOutput.for_tool_call("mockllm/model", "submit", {"answer": "done"})
        # Usage given, so mockllm does not count tokens with tiktoken (which would download encodings).
        output.usage = ModelUsage(input_tokens=1, output_tokens=1, total_tokens=2)
        return output

    return get_model("mockllm/model", custom_outputs=respond, memoize=False)


@needs_bwrap
@pytest.mark.parametrize("solve", [True, False], ids=["reference-solution", "no-op"])
def test_final_state_decides_the_score(solve: bool, tmp_path: Path) -> None:
    (log,) = eval(
        autonomy_lite(max_messages=10),
        model=_scripted_model(solve=solve),
        log_dir=str(tmp_path / "logs"),
        display="none",
        max_samples=4,
    )
    assert log.status == "success", log.error
    assert log.samples is not None and len(log.samples) == len(TASKS)
    for sample in log.samples:
        assert sample.error is None and sample.scores is not None, sample.error
        score = sample.scores["final_state_scorer"]
        assert score.value == (CORRECT if solve else INCORRECT), (sample.id, score.explanation)
        assert score.explanation and score.explanation.startswith("PASS" if solve else "FAIL")


@needs_bwrap
async def test_checks_ignore_files_planted_by_the_agent() -> None:
    # A json.py or sitecustomize.py left in /work must not change how the checker runs.
    item = next(t for t in TASKS if t.id == "merge_json")
    config = BwrapSandboxConfig()
    environments = await BwrapSandboxEnvironment.sample_init("test", config, {})
    env = environments["default"]
    try:
        for path, content in item.files.items():
            await env.write_file(path, content)
        await env.write_file("json.py", "import sys\nprint('PASS: fake')\nsys.exit(0)\n")
        await env.write_file("sitecustomize.py", "import os\nos._exit(0)\n")
        result = await env.exec(
            [*CHECK_COMMAND, item.check], env={"PYTHONPATH": "/work", "PYTHONSTARTUP": "/work/json.py"}
        )
        assert not result.success and result.stdout.startswith("FAIL"), result
    finally:
        await BwrapSandboxEnvironment.sample_cleanup("test", config, environments, False)


@needs_bwrap
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_runs_through_the_gateway(lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = eval_through_lab(lab, autonomy_lite(max_messages=4), tmp_path / "logs", monkeypatch, limit=3)
    assert log.status == "success", log.error.traceback if log.error else None
    assert log.eval.metadata is not None and log.eval.metadata["dataset_hash"] == dataset_hash()
    assert log.samples is not None and len(log.samples) == 3
    for sample in log.samples:
        # The echo model changes nothing, so every check fails on the untouched files.
        assert sample.error is None and sample.scores is not None
        score = sample.scores["final_state_scorer"]
        assert score.value == INCORRECT and score.explanation and score.explanation.startswith("FAIL")
    calls = [r for r in lab.audit_rows() if r.path == "/v1/chat/completions"]
    assert calls and all(r.outcome == "allowed" for r in calls)
