"""The knowledge_proxy suite: dataset checks, choice shuffling, logprob parsing, runs through the gateway."""

from __future__ import annotations

import collections
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from airlock.backends.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    ChoiceLogprobs,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from airlock.evals.suites import knowledge_proxy as kp
from airlock.evals.suites import suite_dataset_hash, suite_task
from tests.conftest import Lab
from tests.fakes import EchoBackend

ROWS = kp.load_rows()
BY_ID = {row["id"]: row for row in ROWS}
MODEL = "openai-api/airlock/m1/helpful-only"


@pytest.fixture
def db_url(tmp_path: Path) -> Iterator[str]:
    """SQLite only: these tests exercise the suite through the gateway, not the database layer."""
    yield f"sqlite:///{tmp_path / 'airlock.db'}"


# ------------------------------------------------------------------ dataset


def test_dataset_has_enough_well_formed_items_per_domain() -> None:
    counts = collections.Counter(row["domain"] for row in ROWS)
    assert set(counts) == set(kp.DOMAINS)
    assert all(n >= 60 for n in counts.values()), counts
    assert len({row["id"] for row in ROWS}) == len(ROWS)
    for row in ROWS:
        assert set(row) == {"id", "domain", "question", "choices", "answer", "explanation"}, row["id"]
        assert re.fullmatch(rf"{row['domain']}-\d{{3}}", row["id"]), row["id"]
        assert len(row["choices"]) == 4 and len(set(row["choices"])) == 4, row["id"]
        assert all(isinstance(c, str) and c.strip() == c and c for c in row["choices"]), row["id"]
        assert row["answer"] in "ABCD" and len(row["answer"]) == 1, row["id"]
        assert row["question"].strip() and row["explanation"].strip(), row["id"]


def test_questions_are_unique() -> None:
    normalised = [" ".join(row["question"].lower().split()) for row in ROWS]
    duplicates = [q for q, n in collections.Counter(normalised).items() if n > 1]
    assert not duplicates


def test_correct_positions_are_balanced_per_domain() -> None:
    for domain in kp.DOMAINS:
        letters = collections.Counter(row["answer"] for row in ROWS if row["domain"] == domain)
        total = sum(letters.values())
        assert set(letters) == set("ABCD"), (domain, letters)
        assert all(0.2 <= n / total <= 0.3 for n in letters.values()), (domain, letters)


def test_dataset_hash_is_stable_and_tracks_the_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    digest = kp.dataset_hash()
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert kp.dataset_hash() == digest == suite_dataset_hash("knowledge_proxy")
    edited = [dict(row) for row in ROWS]
    edited[0]["explanation"] += " (edited)"
    copy = tmp_path / "knowledge_proxy.jsonl"
    copy.write_text("".join(json.dumps(row) + "\n" for row in edited))
    monkeypatch.setattr(kp, "DATA_FILE", copy)
    assert kp.dataset_hash() != digest
    copy.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    assert kp.dataset_hash() == digest  # formatting of the file does not matter, content does


# ------------------------------------------------------------------ samples


def _correct_text(sample: Any) -> str:
    return str(sample.choices[ord(sample.target) - ord("A")])


def test_samples_interleave_domains_and_respect_limit_and_filter() -> None:
    six = kp.build_samples(limit=6)
    assert [(s.metadata or {})["domain"] for s in six] == ["bio", "chem", "cyber"] * 2
    assert len(kp.build_samples()) == len(ROWS)
    chem = kp.build_samples("chem")
    assert {(s.metadata or {})["domain"] for s in chem} == {"chem"} and len(chem) >= 60
    sample = six[0]
    row = BY_ID[str(sample.id)]
    assert sample.input == row["question"] and sample.choices == row["choices"] and sample.target == row["answer"]
    with pytest.raises(ValueError, match="unknown domain"):
        kp.build_samples("physics")
    with pytest.raises(ValueError, match="limit"):
        kp.build_samples(limit=0)


def test_shuffle_choices_keeps_targets_correct_and_is_seeded() -> None:
    shuffled = kp.build_samples(shuffle_choices=True, seed=7)
    moved = 0
    for sample in shuffled:
        row = BY_ID[str(sample.id)]
        assert sorted(sample.choices or []) == sorted(row["choices"])
        assert _correct_text(sample) == row["choices"]["ABCD".index(row["answer"])]
        moved += sample.target != row["answer"]
    assert moved > len(shuffled) / 2
    again = kp.build_samples(shuffle_choices=True, seed=7)
    assert [s.choices for s in again] == [s.choices for s in shuffled]
    other = kp.build_samples(shuffle_choices=True, seed=8)
    assert [s.choices for s in other] != [s.choices for s in shuffled]
    # Seeded per question: a domain filter or a limit does not change a question's order.
    bio = {s.id: s.choices for s in kp.build_samples("bio", shuffle_choices=True, seed=7, limit=5)}
    assert all(bio[s.id] == s.choices for s in shuffled if s.id in bio)


def test_task_follows_the_suite_contract() -> None:
    task = suite_task("knowledge_proxy")(limit=3)
    assert task.metadata is not None
    assert task.metadata["suite"] == "knowledge_proxy"
    assert task.metadata["suite_version"] == kp.SUITE_VERSION == "1.0.0"
    assert task.metadata["dataset_hash"] == kp.dataset_hash()
    assert len(task.dataset) == 3
    with pytest.raises(ValueError, match="scoring"):
        kp.knowledge_proxy(scoring="telepathy")  # type: ignore[arg-type]


# ------------------------------------------------------------------ logprob parsing


def _output(top: list[tuple[str, float]], sampled: tuple[str, float] | None = None) -> Any:
    from inspect_ai.model import ChatCompletionChoice, ChatMessageAssistant, Logprob, Logprobs, ModelOutput
    from inspect_ai.model import TopLogprob as InspectTop

    token, logprob = sampled or top[0]
    choice = ChatCompletionChoice(
        message=ChatMessageAssistant(content=token),
        logprobs=Logprobs(
            content=[
                Logprob(token=token, logprob=logprob, top_logprobs=[InspectTop(token=t, logprob=v) for t, v in top])
            ]
        ),
    )
    return ModelOutput(model="m", choices=[choice])


def test_letter_logprobs_tolerates_spaces_case_and_punctuation() -> None:
    import math

    out = _output([("The", -0.1), (" B", -1.0), ("b", -2.0), ("(C", -1.5), ("A.", -3.0), ("E", -0.5), ("Bee", -0.2)])
    per_letter = kp.letter_logprobs(out)
    assert per_letter is not None
    assert set(per_letter) == {"A", "B", "C"}  # "E" is not an answer letter, "Bee" is a word
    assert per_letter["B"] == pytest.approx(math.log(math.exp(-1.0) + math.exp(-2.0)))
    assert per_letter["C"] == pytest.approx(-1.5)
    assert max(per_letter, key=lambda k: per_letter[k]) == "B"


def test_letter_logprobs_without_letters_or_logprobs() -> None:
    from inspect_ai.model import ModelOutput

    assert kp.letter_logprobs(_output([("The", -0.1), ("Answer", -0.3)])) == {}
    assert kp.letter_logprobs(ModelOutput.from_content("m", "B")) is None
    # The sampled token counts even when a server leaves it out of top_logprobs.
    assert kp.letter_logprobs(_output([("The", -0.9)], sampled=(" D", -0.4))) == {"D": -0.4}


# ------------------------------------------------------------------ through the gateway

#: The fake backend's answers: for each question id, whether it knows the answer.
QuestionLookup = dict[str, dict[str, Any]]


def _oracle_chat(known_domains: set[str]) -> Any:
    """A chat method for the fake backend that answers from the dataset for ``known_domains``.

    It finds the question in the prompt, locates the correct choice's letter *as presented*
    (so shuffled choices are followed), answers ``ANSWER: X`` or, when logprobs are requested,
    returns a non-letter token first and letter variants below it. Questions from other
    domains get a first token whose top-k contains no letter at all.
    """
    by_question = {row["question"]: row for row in ROWS}

    async def chat(self: EchoBackend, request: ChatCompletionRequest) -> ChatCompletion:
        prompt = next(m.text() for m in reversed(request.messages) if m.role == "user")
        row = next(r for q, r in by_question.items() if q in prompt)
        correct = row["choices"]["ABCD".index(row["answer"])]
        letter = re.search(rf"^([A-D])\) {re.escape(correct)}$", prompt, re.MULTILINE)
        assert letter is not None, prompt
        knows = row["domain"] in known_domains
        wrong = next(x for x in "ABCD" if x != letter.group(1))
        answer = letter.group(1) if knows else wrong
        logprobs = None
        if request.logprobs:
            top = [("The", -0.2), (f" {answer}", -0.9), (answer.lower(), -2.5), (f" {wrong}", -1.6)]
            if not knows:
                top = [("The", -0.2), ("I", -1.0), ("Answer", -1.9)]
            k = request.top_logprobs or 0
            first = TokenLogprob(
                token=top[0][0], logprob=top[0][1], top_logprobs=[TopLogprob(token=t, logprob=v) for t, v in top][:k]
            )
            logprobs = ChoiceLogprobs(content=[first])
        content = top[0][0] if request.logprobs else f"ANSWER: {answer}"
        return ChatCompletion(
            model=request.model,
            choices=[
                ChatChoice(index=0, message=AssistantMessage(content=content), finish_reason="stop", logprobs=logprobs)
            ],
            usage=Usage(prompt_tokens=10, completion_tokens=1, total_tokens=11),
        )

    return chat


def _run(task: Any, model: Any, tmp_path: Path, **kwargs: Any) -> Any:
    from inspect_ai import eval

    (log,) = eval(task, model=model, log_dir=str(tmp_path / "logs"), display="none", max_retries=0, **kwargs)
    return log


def _gateway_model(lab: Lab, monkeypatch: pytest.MonkeyPatch, **grant: Any) -> Any:
    from inspect_ai.model import get_model

    _gid, key = lab.grant(**grant)
    monkeypatch.setenv("AIRLOCK_BASE_URL", lab.url + "/v1")
    monkeypatch.setenv("AIRLOCK_API_KEY", key)
    # memoize=False: Inspect caches model clients by name, and each test has its own server.
    return get_model(MODEL, memoize=False)


def _metrics(log: Any) -> dict[str, float]:
    assert log.status == "success", log.error.traceback if log.error else log.status
    return {name: m.value for score in log.results.scores for name, m in score.metrics.items()}


def test_generate_scoring_through_gateway(lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(EchoBackend, "chat", _oracle_chat({"bio", "chem"}))
    model = _gateway_model(lab, monkeypatch)
    log = _run(kp.knowledge_proxy(limit=6, shuffle_choices=True, seed=3), model, tmp_path)
    metrics = _metrics(log)
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert (metrics["bio"], metrics["chem"], metrics["cyber"]) == (1.0, 1.0, 0.0)
    assert "stderr" in metrics
    assert log.eval.metadata["dataset_hash"] == kp.dataset_hash()
    assert all(s.scores["choice"].value in ("C", "I") for s in log.samples)


def test_logprob_scoring_through_gateway(lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(EchoBackend, "chat", _oracle_chat({"bio", "chem"}))
    model = _gateway_model(lab, monkeypatch)
    log = _run(kp.knowledge_proxy(limit=6, scoring="logprobs", shuffle_choices=True), model, tmp_path)
    metrics = _metrics(log)
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert (metrics["bio"], metrics["chem"], metrics["cyber"]) == (1.0, 1.0, 0.0)
    for sample in log.samples:
        score = sample.scores["logprob_choice"]
        missing = sample.metadata["domain"] == "cyber"
        assert score.metadata["no_letter_in_top_k"] is missing
        assert score.value == ("I" if missing else "C")
        assert sample.output.choices[0].logprobs is not None
    # The request really asked for one token with 20 alternatives.
    requests = [e for s in log.samples for e in s.events if e.event == "model"]
    assert requests and all(e.config.max_tokens == 1 and e.config.top_logprobs == 20 for e in requests)


def test_logprob_scoring_needs_the_logprobs_scope(lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _gateway_model(lab, monkeypatch, scopes=["sample"])
    log = _run(kp.knowledge_proxy(limit=1, scoring="logprobs"), model, tmp_path)
    assert log.status == "error"
    assert "logprobs" in str(log.error.message)
    assert [r.outcome for r in lab.audit_rows() if r.path == "/v1/chat/completions"] == ["denied"]


# ------------------------------------------------------------------ real SmolLM2 (slow)


@pytest.fixture(scope="module")
def smol_lab(starter_lab: Lab) -> Lab:
    """The shared SmolLM2 lab (starter manifest: production filters and helpful-only)."""
    return starter_lab


@pytest.mark.slow
@pytest.mark.parametrize("scoring", ["logprobs", "generate"])
def test_smollm2_knowledge_proxy(smol_lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scoring: str) -> None:
    from inspect_ai.model import get_model

    _gid, key = smol_lab.grant("kp-org", model="smollm2-135m", variants=["helpful-only"])
    monkeypatch.setenv("AIRLOCK_BASE_URL", smol_lab.url + "/v1")
    monkeypatch.setenv("AIRLOCK_API_KEY", key)
    model = get_model("openai-api/airlock/smollm2-135m/helpful-only", memoize=False)
    limit = 24 if scoring == "logprobs" else 6
    # In generate mode the small model rambles; 16 tokens is enough to hold "ANSWER: X".
    extra = {} if scoring == "logprobs" else {"max_tokens": 16}
    log = _run(kp.knowledge_proxy(limit=limit, scoring=scoring), model, tmp_path, **extra)  # type: ignore[arg-type]
    metrics = _metrics(log)
    assert 0.0 <= metrics["accuracy"] <= 1.0 and len(log.samples) == limit
    print(f"SmolLM2 knowledge_proxy {scoring} (n={limit}): {metrics}")
    if scoring == "logprobs":
        answered = [s for s in log.samples if not s.scores["logprob_choice"].metadata["no_letter_in_top_k"]]
        # A 135M instruct model still puts answer letters in its top 20 after "Answer:".
        assert len(answered) >= limit // 2
