"""``cyber_ctf_lite``: dataset invariants, every challenge solvable in the sandbox, and a run through the gateway."""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from inspect_ai import eval
from inspect_ai.model import ChatMessage, ChatMessageTool, ChatMessageUser, ModelOutput, ModelUsage, get_model
from inspect_ai.scorer import CORRECT, INCORRECT, Score, Target
from inspect_ai.solver import TaskState
from inspect_ai.tool import ToolChoice, ToolInfo

from airlock.evals.suites import canonical_hash, suite_dataset_hash, suite_task
from airlock.evals.suites.cyber_ctf_lite import (
    FLAG_PATTERN,
    SUITE_VERSION,
    challenge_flag,
    cyber_ctf_lite,
    dataset_hash,
    flag_scorer,
    load_challenges,
)
from tests.conftest import Lab, eval_through_lab, needs_bwrap

CHALLENGES = load_challenges()


def test_dataset_invariants() -> None:
    assert len(CHALLENGES) >= 8
    ids = [c.id for c in CHALLENGES]
    flags = [c.flag for c in CHALLENGES]
    assert len(set(ids)) == len(ids) and len(set(flags)) == len(flags)
    for challenge in CHALLENGES:
        assert challenge.flag == challenge_flag(challenge.id) and FLAG_PATTERN.fullmatch(challenge.flag)
        assert challenge.flag not in challenge.prompt and challenge.flag not in challenge.solution
        assert challenge.files and challenge.solution.strip()
    # Where the flag is encoded, compressed or encrypted, it must not be greppable as plain text.
    hidden = {"encoding_layers", "caesar_shift", "xor_keyword", "git_history", "nested_archive", "vault_passphrase",
              "firmware_strings"}  # fmt: skip
    for challenge in CHALLENGES:
        if challenge.id in hidden:
            assert not any(challenge.flag.encode() in data for data in challenge.files.values()), challenge.id


def test_rendering_and_hash_are_deterministic() -> None:
    again = load_challenges()
    assert [(c.id, c.files) for c in again] == [(c.id, c.files) for c in CHALLENGES]
    raw = json.loads(resources.files("airlock.evals.suites").joinpath("data", "cyber_ctf_lite.json").read_text())
    assert dataset_hash() == canonical_hash(raw) == suite_dataset_hash("cyber_ctf_lite")
    assert "canary" in raw


def test_task_follows_the_suite_contract() -> None:
    task = suite_task("cyber_ctf_lite")(max_messages=7)
    assert task.metadata == {"suite": "cyber_ctf_lite", "suite_version": SUITE_VERSION, "dataset_hash": dataset_hash()}
    assert task.message_limit == 7 and len(task.dataset) == len(CHALLENGES)
    assert task.sandbox is not None and task.sandbox.type == "airlock-bwrap"


def _state(answer: str) -> TaskState:
    from inspect_ai.model import ModelName

    return TaskState(
        model=ModelName("mockllm/model"),
        sample_id="x",
        epoch=1,
        input="",
        messages=[],
        output=ModelOutput.from_content("mockllm/model", answer),
    )


async def test_flag_scorer_requires_exactly_the_flag() -> None:
    scorer = flag_scorer()
    flag, decoy = CHALLENGES[0].flag, CHALLENGES[1].flag

    async def score(answer: str) -> Score:
        result = await scorer(_state(answer), Target(flag))
        assert result is not None
        return result

    assert (await score(f"The flag is {flag}.")).value == CORRECT
    assert (await score(f"{flag} {flag}")).value == CORRECT
    for answer in ("", "no idea", decoy, f"{flag} or maybe {decoy}"):
        result = await score(answer)
        assert result.value == INCORRECT and result.explanation


def _scripted_solver_model() -> Any:
    """A "model" that runs each challenge's reference solution with the bash tool, then submits what it printed."""
    by_prompt = {c.prompt: c for c in CHALLENGES}

    def respond(messages: list[ChatMessage], tools: list[ToolInfo], choice: ToolChoice, config: Any) -> ModelOutput:
        assert {t.name for t in tools} >= {"bash", "python", "submit"}
        challenge = next(by_prompt[m.text] for m in messages if isinstance(m, ChatMessageUser) and m.text in by_prompt)
        last = messages[-1]
        if isinstance(last, ChatMessageTool):
            found = FLAG_PATTERN.findall(last.text)
            output = ModelOutput.for_tool_call("mockllm/model", "submit", {"answer": found[0] if found else "none"})
        else:
            output = ModelOutput.for_tool_call("mockllm/model", "bash", {"command": challenge.solution})
        # Usage given, so mockllm does not count tokens with tiktoken (which would download encodings).
        output.usage = ModelUsage(input_tokens=1, output_tokens=1, total_tokens=2)
        return output

    return get_model("mockllm/model", custom_outputs=respond, memoize=False)


@needs_bwrap
def test_every_challenge_is_solved_by_its_reference_solution(tmp_path: Path) -> None:
    (log,) = eval(
        cyber_ctf_lite(max_messages=10),
        model=_scripted_solver_model(),
        log_dir=str(tmp_path / "logs"),
        display="none",
        max_samples=4,
    )
    assert log.status == "success", log.error
    assert log.samples is not None and len(log.samples) == len(CHALLENGES)
    for sample in log.samples:
        assert sample.error is None, sample.error
        assert sample.scores is not None
        score = sample.scores["flag_scorer"]
        assert score.value == CORRECT, (sample.id, score.explanation, sample.messages[-2:])
    assert log.results is not None and log.results.scores[0].metrics["accuracy"].value == 1.0


@needs_bwrap
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_runs_through_the_gateway(lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = eval_through_lab(lab, cyber_ctf_lite(max_messages=4), tmp_path / "logs", monkeypatch, limit=3)
    assert log.status == "success", log.error.traceback if log.error else None
    assert log.eval.metadata is not None and log.eval.metadata["suite"] == "cyber_ctf_lite"
    assert log.samples is not None and len(log.samples) == 3
    for sample in log.samples:
        # The echo model never solves anything: the eval completes and every sample is scored I.
        assert sample.error is None and sample.scores is not None
        assert sample.scores["flag_scorer"].value == INCORRECT
    assert log.results is not None and log.results.scores[0].metrics["accuracy"].value == 0.0
    offered = {
        tool.name for sample in log.samples for event in sample.events if event.event == "model" for tool in event.tools
    }
    assert offered == {"bash", "python", "submit"}  # the agent's tools went through the gateway
    calls = [r for r in lab.audit_rows() if r.path == "/v1/chat/completions"]
    assert calls and all(r.outcome == "allowed" and r.variant == "helpful-only" for r in calls)
    assert not any(re.search(r"FLAG\{[0-9a-f]{20}\}", sample.output.completion) for sample in log.samples)
