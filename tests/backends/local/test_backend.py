"""The local backend's OpenAI surface: chat and completions, whole and streamed, on tiny-random and SmolLM2."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pytest

from airlock.backends.local import LocalBackend
from airlock.backends.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessage,
    Completion,
    CompletionRequest,
)
from airlock.backends.registry import create_backend
from airlock.errors import ConfigError, InvalidRequestError
from tests.backends.local.helpers import (
    PROMPTS,
    chat,
    chat_ids,
    collect,
    forward_logprobs,
    greedy_reference,
    table,
    text_of,
)

# ---------------------------------------------------------------- construction


def test_from_config_validates_then_builds() -> None:
    with pytest.raises(ConfigError, match="unknown config key"):
        LocalBackend.from_config({"model": "tiny-random", "batchsize": 4})
    backend = LocalBackend.from_config({"model": "tiny-random", "seed": 4})
    assert backend.spec.spec == "tiny-random:4"
    assert backend.config.seed == 4 and backend.stats.as_dict() == dict.fromkeys(backend.stats.as_dict(), 0)
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


async def test_count_tokens(tiny_backend: LocalBackend) -> None:
    assert tiny_backend.count_tokens("Hello world") == 2
    assert tiny_backend.count_tokens("") == 0


# ---------------------------------------------------------------- completions


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
