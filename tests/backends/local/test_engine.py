"""The batching engine: shared and merged batches, per-row sampling, cancellation, failures, detokenization."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from airlock.backends.local import LocalBackend
from airlock.backends.local import engine as engine_module
from airlock.backends.local.engine import Engine, Row, row_generator
from airlock.backends.local.tokens import TokenTable
from airlock.backends.protocol import ChatCompletion, CompletionRequest
from airlock.errors import BackendError
from tests.backends.local.helpers import PROMPTS, chat, forward_logprobs, table, text_of

# ---------------------------------------------------------------- batching


async def test_greedy_batched_equals_one_at_a_time(tiny_backend: LocalBackend) -> None:
    solo = [text_of(await tiny_backend.chat(chat(p, max_tokens=12))) for p in PROMPTS]
    before = tiny_backend.stats.prefills
    together = await asyncio.gather(*(tiny_backend.chat(chat(p, max_tokens=12)) for p in PROMPTS))
    assert [text_of(r) for r in together] == solo
    assert tiny_backend.stats.prefills - before < len(PROMPTS)  # they shared prefills


async def test_concurrent_requests_share_one_batch(model_cache: Path) -> None:
    backend = LocalBackend.from_config({"model": "tiny-random", "max_batch_size": 16, "batch_wait_ms": 50})
    await backend.start()
    try:
        await asyncio.gather(*(backend.chat(chat(p, max_tokens=6)) for p in PROMPTS))
        assert backend.stats.max_batch_rows_seen == len(PROMPTS)
        assert backend.stats.prefills == 1
        assert backend.stats.decode_steps == 5  # one step per token after the first, for all rows at once
    finally:
        await backend.aclose()


async def test_a_shared_prompt_prefix_is_computed_once_with_the_same_output(tiny_backend: LocalBackend) -> None:
    # The chat template's system prompt plus a long shared opening, then prompts of unequal length:
    # each row's own tokens run after one copy of the shared tokens' cache, padded in between.
    opening = "Answer the question below in one short sentence, plainly and without any preamble. "
    prompts = [opening + p for p in PROMPTS]
    reqs = [chat(p, max_tokens=10, logprobs=True) for p in prompts]
    solo = [await tiny_backend.chat(r) for r in reqs]
    before = tiny_backend.stats.shared_prefix_tokens
    together = await asyncio.gather(*(tiny_backend.chat(r) for r in reqs))
    shared = tiny_backend.stats.shared_prefix_tokens - before
    assert shared >= (len(prompts) - 1) * 20  # the template's opening and the shared text, once
    assert [text_of(r) for r in together] == [text_of(r) for r in solo]
    for alone, batched in zip(solo, together, strict=True):
        assert alone.choices[0].logprobs is not None and batched.choices[0].logprobs is not None
        expected = [t.logprob for t in alone.choices[0].logprobs.content or []]
        got = [t.logprob for t in batched.choices[0].logprobs.content or []]
        assert got == pytest.approx(expected, abs=1e-4)


def test_only_a_long_enough_prefix_of_one_adapter_is_shared() -> None:
    engine = Engine.__new__(Engine)
    engine.mergeable = True
    same = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10)
    assert engine._shared_prefix([(*same, 11, 12), (*same, 13)], [None, None]) == 10
    assert engine._shared_prefix([same, same], [None, None]) == 9  # each row keeps its last token
    assert engine._shared_prefix([(*same, 11), (*same[:7], 0, 0, 0)], [None, None]) == 0  # 7: too few
    assert engine._shared_prefix([(*same, 11), (*same, 12)], ["a", None]) == 0  # another adapter
    assert engine._shared_prefix([(*same, 11)], [None]) == 0  # one prompt
    engine.mergeable = False  # e.g. sliding-window layers: the cache is not a plain one to copy
    assert engine._shared_prefix([(*same, 11), (*same, 12)], [None, None]) == 0


async def test_latecomer_joins_running_batch_with_same_output(tiny_backend: LocalBackend) -> None:
    long_req, late_req = chat(PROMPTS[4], max_tokens=300), chat(PROMPTS[1], max_tokens=10)
    long_solo = text_of(await tiny_backend.chat(long_req))
    late_solo = text_of(await tiny_backend.chat(late_req))
    merges = tiny_backend.stats.merges
    pieces: list[str] = []
    late: asyncio.Task[ChatCompletion] | None = None
    async for chunk in tiny_backend.chat_stream(long_req):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
        if late is None and len(pieces) >= 3:  # the long request is mid-generation now
            late = asyncio.create_task(tiny_backend.chat(late_req))
    assert late is not None
    assert text_of(await late) == late_solo
    assert "".join(pieces) == long_solo
    assert tiny_backend.stats.merges > merges  # admitted into the running batch, not after it


@pytest.mark.parametrize(
    ("cores", "load", "own", "team"),
    [
        (2, 0.0, 2, 2),  # idle host: every core
        (2, 2.1, 2, 2),  # the load is this team's own
        (2, 3.0, 2, 1),  # another process takes a core
        (2, 16.0, 2, 1),  # a busy shared host: one thread, never zero
        (8, 3.0, 1, 6),  # two cores' worth of other work on eight
        (1, 0.0, 1, 1),
    ],
)
def test_auto_threads_leaves_busy_cores_to_the_host(cores: int, load: float, own: int, team: int) -> None:
    assert engine_module.auto_threads(cores, load, own) == team


async def test_team_is_sized_from_host_load_between_batches(model_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    load = [50.0]
    monkeypatch.setattr(engine_module.os, "getloadavg", lambda: (load[0], load[0], load[0]))
    auto = LocalBackend.from_config({"model": "tiny-random"})
    fixed = LocalBackend.from_config({"model": "tiny-random", "threads": 1})
    await auto.start()
    await fixed.start()
    try:
        engine = auto._engine
        assert engine is not None
        cores = engine.intra_op_threads
        assert cores >= 1  # torch's default until a batch starts
        await auto.chat(chat(PROMPTS[0], max_tokens=2))
        assert engine.intra_op_threads == 1  # a host this busy: one thread
        load[0] = 0.0
        await auto.chat(chat(PROMPTS[0], max_tokens=2))
        assert engine.intra_op_threads == cores  # idle again: torch's default
        assert fixed._engine is not None
        await fixed.chat(chat(PROMPTS[0], max_tokens=2))
        assert fixed._engine.intra_op_threads == 1  # `threads` is never overridden
    finally:
        await auto.aclose()
        await fixed.aclose()


async def test_static_batching_makes_latecomers_wait(model_cache: Path) -> None:
    backend = LocalBackend.from_config({"model": "tiny-random", "continuous_batching": False})
    await backend.start()
    try:
        long_req, late_req = chat(PROMPTS[4], max_tokens=200), chat(PROMPTS[1], max_tokens=5)
        late_solo = text_of(await backend.chat(late_req))
        late: asyncio.Task[ChatCompletion] | None = None
        async for chunk in backend.chat_stream(long_req):
            if late is None and chunk.choices and chunk.choices[0].delta.content:
                late = asyncio.create_task(backend.chat(late_req))
        assert late is not None and text_of(await late) == late_solo
        assert backend.stats.merges == 0 and backend.stats.max_batch_rows_seen == 1
    finally:
        await backend.aclose()


async def test_seed_reproducible_alone_and_batched(tiny_backend: LocalBackend) -> None:
    req = chat(PROMPTS[2], temperature=0.9, top_p=0.95, seed=1234, max_tokens=12)
    alone = text_of(await tiny_backend.chat(req))
    others = [chat(p, temperature=1.0, max_tokens=12) for p in PROMPTS]
    batched = await asyncio.gather(tiny_backend.chat(req), *(tiny_backend.chat(o) for o in others))
    assert text_of(batched[0]) == alone
    other_seed = text_of(await tiny_backend.chat(chat(PROMPTS[2], temperature=0.9, top_p=0.95, seed=99, max_tokens=12)))
    assert other_seed != alone


@pytest.mark.parametrize("budget", ["default", "one-row-per-prefill"])
async def test_echo_scoring_equals_direct_forward(
    tiny_backend: LocalBackend, monkeypatch: pytest.MonkeyPatch, budget: str
) -> None:
    """lm-eval's loglikelihood request: max_tokens=0, echo=True, logprobs=1, token-id prompts."""
    if budget != "default":  # full-vocabulary prompt logits are bounded per prefill: split every row
        monkeypatch.setattr(engine_module, "_ECHO_LOGITS_BUDGET", 1)
    prefills = tiny_backend.stats.prefills
    tok = tiny_backend.tokenizer
    prompts = [tok("The cat sat on the mat.")["input_ids"], tok("Paris is in")["input_ids"], [42]]
    result = await tiny_backend.complete(
        CompletionRequest(model="t", prompt=prompts, max_tokens=0, echo=True, logprobs=1, temperature=0)
    )
    assert result.usage is not None and result.usage.completion_tokens == 0
    assert result.usage.prompt_tokens == sum(len(p) for p in prompts)
    tbl = table(tiny_backend)
    for choice, ids in zip(result.choices, prompts, strict=True):
        lp = choice.logprobs
        assert lp is not None and choice.finish_reason == "length"
        assert choice.text == tbl.decode(ids)
        assert lp.tokens == [tbl.text(i) for i in ids]
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        reference = forward_logprobs(tiny_backend, ids)
        for pos in range(1, len(ids)):
            assert lp.token_logprobs[pos] == pytest.approx(float(reference[pos - 1, ids[pos]]), abs=1e-4)
            top = lp.top_logprobs[pos]
            assert top is not None and len(top) == 1
            best = int(reference[pos - 1].argmax())
            assert top == {tbl.text(best): pytest.approx(float(reference[pos - 1, best]), abs=1e-4)}
        assert lp.text_offset == tbl.offsets(ids)
    assert tiny_backend.stats.prefills - prefills == (1 if budget == "default" else len(prompts))


def test_row_generators_are_reproducible_per_seed_and_choice() -> None:
    cpu = torch.device("cpu")

    def draws(seed: int | None, index: int) -> list[int]:
        return torch.randint(0, 1 << 30, (4,), generator=row_generator(seed, index, cpu)).tolist()

    assert draws(7, 0) == draws(7, 0)
    assert draws(7, 0) != draws(7, 1)  # the choices of one seeded request differ
    assert draws(7, 1) != draws(8, 1)
    assert draws(None, 0) != draws(None, 0)  # no seed: a fresh stream every time


# ---------------------------------------------------------------- cancellation and failures


async def test_cancelled_stream_drops_its_row(tiny_backend: LocalBackend) -> None:
    cancelled = tiny_backend.stats.cancelled_rows
    stream = tiny_backend.chat_stream(chat(PROMPTS[4], max_tokens=2000))
    seen = 0
    async for _chunk in stream:
        seen += 1
        if seen == 3:
            break
    await stream.aclose()  # type: ignore[attr-defined]  # what the server does on disconnect
    started = time.perf_counter()
    result = await tiny_backend.chat(chat(max_tokens=4))
    assert result.usage.completion_tokens == 4
    assert time.perf_counter() - started < 5
    for _ in range(100):
        if tiny_backend.stats.cancelled_rows > cancelled:
            break
        await asyncio.sleep(0.01)
    assert tiny_backend.stats.cancelled_rows > cancelled
    assert tiny_backend.stats.tokens_generated < 10_000


async def test_cancelled_task_drops_its_row(tiny_backend: LocalBackend) -> None:
    cancelled = tiny_backend.stats.cancelled_rows
    task = asyncio.create_task(tiny_backend.chat(chat(PROMPTS[4], max_tokens=2000)))
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (await tiny_backend.chat(chat(max_tokens=2))).usage.completion_tokens == 2
    assert tiny_backend.stats.cancelled_rows > cancelled


async def test_worker_error_fails_only_that_batch(tiny_backend: LocalBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    engine: Engine = tiny_backend._engine  # type: ignore[assignment]
    real = engine.model
    calls = {"n": 0}

    class Flaky:
        def __call__(self, **kwargs: Any) -> Any:
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("simulated kernel failure")
            return real(**kwargs)

        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

    monkeypatch.setattr(engine, "model", Flaky())
    with pytest.raises(BackendError, match="simulated kernel failure") as info:
        await tiny_backend.chat(chat(max_tokens=3))
    assert info.value.status_code == 502
    assert (await tiny_backend.chat(chat(max_tokens=3))).usage.completion_tokens == 3
    assert engine.alive


# ---------------------------------------------------------------- incremental detokenization


class _FakeEngine:
    def __init__(self, tbl: TokenTable) -> None:
        self.table = tbl
        self.eos_ids = frozenset({2})


def _row(stops: list[str] | None = None, max_new: int = 100) -> Row:
    job: Any = SimpleNamespace(dead=False)  # a stand-in: rows only deliver through the engine
    return Row(
        job, 0, [1], max_new=max_new, temperature=0, top_p=1, generator=None, stops=stops or [], logprobs=True, top_k=0
    )


def test_multibyte_tokens_stream_whole_characters(tiny_backend: LocalBackend) -> None:
    tbl = table(tiny_backend)
    engine: Any = _FakeEngine(tbl)
    text = "日本語のテキスト 🎉 café"
    ids = tiny_backend.tokenizer(text)["input_ids"]
    assert any(tbl.text(i).startswith("bytes:") for i in ids)  # some tokens really are partial characters
    row = _row()
    pieces = []
    for token in ids:
        update = row.accept(token, -1.0, None, engine)
        if update is not None:
            assert "\ufffd" not in update.text
            pieces.append(update.text)
    update = row.accept(2, -1.0, None, engine)  # eos
    assert update is not None and update.finish_reason == "stop"
    pieces.append(update.text)
    assert "".join(pieces) == text
    assert update.completion_tokens == len(ids) + 1


def test_stop_string_split_across_tokens_is_held_back(tiny_backend: LocalBackend) -> None:
    tbl = table(tiny_backend)
    engine: Any = _FakeEngine(tbl)
    ids = tiny_backend.tokenizer("alpha beta END gamma")["input_ids"]
    row = _row(stops=["ND g"])
    released = ""
    for token in ids:
        update = row.accept(token, -1.0, None, engine)
        if update is not None:
            released += update.text
            assert "N" not in released
            if update.finish_reason:
                break
    assert released == "alpha beta E" and row.finish_reason == "stop"


# ---------------------------------------------------------------- the real SmolLM2


@pytest.mark.slow
async def test_smollm2_batched_greedy_and_scoring(smol_backend: LocalBackend) -> None:
    reqs = [chat(p, max_tokens=6) for p in PROMPTS[:4]]
    solo = [text_of(await smol_backend.chat(r)) for r in reqs[:2]]
    shared = smol_backend.stats.shared_prefix_tokens
    together = await asyncio.gather(*(smol_backend.chat(r) for r in reqs))
    assert [text_of(r) for r in together[:2]] == solo
    assert smol_backend.stats.shared_prefix_tokens > shared  # the chat template's system prompt, once
    ids = smol_backend.tokenizer("The capital of France is Paris.")["input_ids"]
    scored = await smol_backend.complete(
        CompletionRequest(model="smol", prompt=[ids], max_tokens=0, echo=True, logprobs=1, temperature=0)
    )
    lp = scored.choices[0].logprobs
    assert lp is not None
    reference = forward_logprobs(smol_backend, ids)
    expected = [float(reference[i - 1, ids[i]]) for i in range(1, len(ids))]
    assert lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-3)
