"""OpenAIUpstreamBackend against a real OpenAI-compatible server in a second process."""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import time
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import pytest

from airlock.backends.openai_upstream import OpenAIUpstreamBackend
from airlock.backends.protocol import ChatCompletionChunk, ChatCompletionRequest, Completion, CompletionRequest
from airlock.backends.registry import create_backend
from airlock.errors import (
    BackendError,
    BackendUnavailableError,
    ConfigError,
    InvalidRequestError,
    RateLimitError,
)
from airlock.mitigations.pipeline import build_pipeline
from tests.conftest import EVALUATOR_KEY, KEY_ENV, UPSTREAM_KEY, UPSTREAM_MODEL


def _debug(upstream: str, what: str) -> Any:
    with urllib.request.urlopen(f"{upstream}/_debug/{what}", timeout=5) as response:
        return json.loads(response.read())


def _last_request(upstream: str) -> dict[str, Any]:
    requests: list[dict[str, Any]] = _debug(upstream, "requests")
    return requests[-1]


def _config(upstream: str, **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "base_url": f"{upstream}/v1",
        "model": UPSTREAM_MODEL,
        "api_key_env": KEY_ENV,
        "timeout_s": 10,
    }
    config.update(overrides)
    return config


@pytest.fixture
def key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, UPSTREAM_KEY)


@pytest.fixture
async def backend(upstream: str, key_env: None) -> AsyncIterator[OpenAIUpstreamBackend]:
    b = OpenAIUpstreamBackend.from_config(_config(upstream))
    await b.start()
    try:
        yield b
    finally:
        await b.aclose()


def chat_request(text: str, **fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "acme-1/production", "messages": [{"role": "user", "content": text}], **fields}
    )


def completion_request(prompt: Any, **fields: Any) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "acme-1/base", "prompt": prompt, **fields})


async def collect_chat(backend: OpenAIUpstreamBackend, request: ChatCompletionRequest) -> list[ChatCompletionChunk]:
    return [chunk async for chunk in backend.chat_stream(request)]


async def collect_completion(backend: OpenAIUpstreamBackend, request: CompletionRequest) -> list[Completion]:
    return [chunk async for chunk in backend.complete_stream(request)]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# ---------------------------------------------------------------- round trips


async def test_chat_round_trip_rewrites_model_and_sends_operator_key(
    backend: OpenAIUpstreamBackend, upstream: str
) -> None:
    result = await backend.chat(chat_request("hello upstream", temperature=0, user="evaluator-42"))

    assert result.choices[0].message.content == "maertspu olleh"
    assert result.choices[0].finish_reason == "stop"
    assert result.model == UPSTREAM_MODEL
    assert result.usage.prompt_tokens == 2 and result.usage.total_tokens == 4
    seen = _last_request(upstream)
    assert seen["body"]["model"] == UPSTREAM_MODEL
    assert seen["body"]["stream"] is False
    assert seen["body"]["temperature"] == 0
    # Defaults the client did not set are left to the upstream.
    assert "top_p" not in seen["body"]
    assert seen["headers"]["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert EVALUATOR_KEY not in json.dumps(seen)


async def test_chat_logprobs_pass_through(backend: OpenAIUpstreamBackend) -> None:
    result = await backend.chat(chat_request("abc", logprobs=True, top_logprobs=1))
    logprobs = result.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None
    assert [t.token for t in logprobs.content] == ["c", "b", "a"]
    assert logprobs.content[0].top_logprobs[0].logprob == pytest.approx(-0.1)


async def test_chat_stream_round_trip(backend: OpenAIUpstreamBackend, upstream: str) -> None:
    chunks = await collect_chat(backend, chat_request("stream me please", n=2))

    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 6
    assert all(c.usage is None for c in chunks[:-1])
    text: dict[int, str] = {}
    for chunk in chunks[:-1]:
        for choice in chunk.choices:
            text[choice.index] = text.get(choice.index, "") + (choice.delta.content or "")
    assert text == {0: "esaelp em maerts", 1: "esaelp em maerts"}
    assert len(chunks) > 4  # really streamed, not one blob
    finals = [c.choices[0].finish_reason for c in chunks[:-1] if c.choices and c.choices[0].finish_reason]
    assert finals == ["stop", "stop"]
    body = _last_request(upstream)["body"]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["model"] == UPSTREAM_MODEL


async def test_chat_stream_synthesizes_usage_when_upstream_omits_it(backend: OpenAIUpstreamBackend) -> None:
    chunks = await collect_chat(backend, chat_request("TRIGGER_NOUSAGE " + "x" * 40))
    usage = chunks[-1].usage
    assert usage is not None and chunks[-1].choices == []
    assert usage.completion_tokens == backend.count_tokens("x" * 40 + " EGASUON_REGGIRT")
    assert usage.prompt_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


async def test_chat_synthesizes_usage_when_upstream_omits_it(backend: OpenAIUpstreamBackend) -> None:
    result = await backend.chat(chat_request("TRIGGER_NOUSAGE please"))
    assert result.usage.completion_tokens > 0 and result.usage.prompt_tokens > 0


async def test_nonstandard_finish_reason_is_normalized(backend: OpenAIUpstreamBackend) -> None:
    result = await backend.chat(chat_request("TRIGGER_ODD_FINISH"))
    assert result.choices[0].finish_reason == "stop"
    chunks = await collect_chat(backend, chat_request("TRIGGER_ODD_FINISH"))
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]


async def test_completions_round_trip(backend: OpenAIUpstreamBackend, upstream: str) -> None:
    result = await backend.complete(completion_request(["abc", "hello"], n=2, logprobs=1, max_tokens=5))

    assert [c.text for c in result.choices] == ["cba", "cba", "olleh", "olleh"]
    assert [c.index for c in result.choices] == [0, 1, 2, 3]
    assert result.choices[0].logprobs is not None
    assert result.choices[0].logprobs.tokens == ["c", "b", "a"]
    assert result.usage is not None and result.usage.prompt_tokens == 2
    body = _last_request(upstream)["body"]
    assert body["model"] == UPSTREAM_MODEL and body["max_tokens"] == 5 and body["prompt"] == ["abc", "hello"]


async def test_completions_token_id_prompt_is_forwarded(backend: OpenAIUpstreamBackend, upstream: str) -> None:
    await backend.complete(completion_request([1, 2, 3]))
    assert _last_request(upstream)["body"]["prompt"] == [1, 2, 3]


async def test_completion_stream_round_trip(backend: OpenAIUpstreamBackend) -> None:
    chunks = await collect_completion(backend, completion_request("hello world"))
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 2
    assert all(c.usage is None for c in chunks[:-1])
    assert "".join(c.choices[0].text for c in chunks[:-1]) == "dlrow olleh"
    assert chunks[-2].choices[0].finish_reason == "length"


async def test_completion_stream_synthesizes_usage(backend: OpenAIUpstreamBackend) -> None:
    chunks = await collect_completion(backend, completion_request("TRIGGER_NOUSAGE abcd"))
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens > 0 and usage.prompt_tokens > 0


async def test_extra_headers_are_sent(upstream: str, key_env: None) -> None:
    b = OpenAIUpstreamBackend.from_config(_config(upstream, extra_headers={"X-Lab-Route": "eval-pool"}))
    try:
        await b.chat(chat_request("hi"))
    finally:
        await b.aclose()
    assert _last_request(upstream)["headers"]["X-Lab-Route"] == "eval-pool"


async def test_session_is_created_lazily_without_start(upstream: str, key_env: None) -> None:
    b = OpenAIUpstreamBackend.from_config(_config(upstream))
    try:
        assert (await b.chat(chat_request("lazy"))).choices[0].message.content == "yzal"
    finally:
        await b.aclose()
    await b.aclose()  # idempotent


def test_backend_survives_a_change_of_event_loop(upstream: str, key_env: None) -> None:
    # The pattern of session-scoped fixtures: started under one loop, used under others.
    b = OpenAIUpstreamBackend.from_config(_config(upstream))
    asyncio.run(b.start())
    assert asyncio.run(b.chat(chat_request("loop one"))).choices[0].message.content == "eno pool"
    assert asyncio.run(b.chat(chat_request("loop two"))).choices[0].message.content == "owt pool"
    asyncio.run(b.aclose())


async def test_concurrent_requests_share_a_bounded_pool(upstream: str, key_env: None) -> None:
    b = OpenAIUpstreamBackend.from_config(_config(upstream, max_connections=4))
    try:
        results = await asyncio.gather(*(b.chat(chat_request(f"req {i}")) for i in range(32)))
    finally:
        await b.aclose()
    assert [r.choices[0].message.content for r in results] == [f"req {i}"[::-1] for i in range(32)]


async def test_registry_builds_the_backend(upstream: str, key_env: None) -> None:
    b = create_backend("openai_upstream", _config(upstream))
    assert isinstance(b, OpenAIUpstreamBackend)
    assert b.supports_logprobs is True and b.supports_echo is False
    await b.aclose()


async def test_pipeline_system_prompt_reaches_upstream(upstream: str, key_env: None) -> None:
    inner = OpenAIUpstreamBackend.from_config(_config(upstream))
    pipeline = build_pipeline(
        inner, [{"name": "sp", "kind": "system_prompt", "config": {"prompt": "Be safe."}, "stance": "claimed"}]
    )
    await pipeline.start()
    try:
        result = await pipeline.chat(chat_request("hi there"))
    finally:
        await pipeline.aclose()
    assert result.choices[0].message.content == "ereht ih"
    messages = _last_request(upstream)["body"]["messages"]
    assert messages[0] == {"role": "system", "content": "Be safe."}


# ---------------------------------------------------------------- capability checks


async def test_logprobs_refused_when_upstream_lacks_them(upstream: str, key_env: None) -> None:
    b = OpenAIUpstreamBackend.from_config(_config(upstream, supports_logprobs=False))
    try:
        assert b.supports_logprobs is False
        with pytest.raises(InvalidRequestError, match="log-probabilities"):
            await b.chat(chat_request("x", logprobs=True))
        with pytest.raises(InvalidRequestError, match="log-probabilities"):
            await b.complete(completion_request("x", logprobs=2))
    finally:
        await b.aclose()


async def test_echo_with_logprobs_needs_supports_echo(backend: OpenAIUpstreamBackend) -> None:
    with pytest.raises(InvalidRequestError, match="echo"):
        await backend.complete(completion_request("x", echo=True, logprobs=1))
    result = await backend.complete(completion_request("ab", echo=True))
    assert result.choices[0].text == "abba"


# ---------------------------------------------------------------- error mapping


async def test_upstream_500_is_a_backend_error_without_upstream_details(backend: OpenAIUpstreamBackend) -> None:
    with pytest.raises(BackendError) as info:
        await backend.chat(chat_request("TRIGGER_500"))
    assert type(info.value) is BackendError and info.value.status_code == 502
    assert "secret" not in info.value.message and "HTTP 500" in info.value.message


async def test_upstream_429_is_a_rate_limit_error(backend: OpenAIUpstreamBackend) -> None:
    with pytest.raises(RateLimitError) as info:
        await backend.chat(chat_request("TRIGGER_429"))
    assert info.value.retry_after == 7
    with pytest.raises(RateLimitError):
        await collect_chat(backend, chat_request("TRIGGER_429"))


async def test_upstream_400_is_an_invalid_request_with_its_message(backend: OpenAIUpstreamBackend) -> None:
    with pytest.raises(InvalidRequestError) as info:
        await backend.chat(chat_request("TRIGGER_400"))
    assert "maximum context length" in info.value.message
    assert info.value.param == "messages" and info.value.status_code == 400
    with pytest.raises(InvalidRequestError, match="maximum context length"):
        await collect_completion(backend, completion_request("TRIGGER_400"))


async def test_upstream_error_messages_never_leak_the_upstream_key(backend: OpenAIUpstreamBackend) -> None:
    with pytest.raises(InvalidRequestError) as info:
        await backend.chat(chat_request("TRIGGER_400_KEY"))
    assert UPSTREAM_KEY not in info.value.message and "[redacted]" in info.value.message


async def test_invalid_json_is_a_backend_error(backend: OpenAIUpstreamBackend) -> None:
    with pytest.raises(BackendError, match="invalid response"):
        await backend.chat(chat_request("TRIGGER_BADJSON"))


async def test_wrong_upstream_key_is_the_operators_problem(upstream: str) -> None:
    wrong = "sk-wrong-" + secrets.token_hex(8)
    b = OpenAIUpstreamBackend.from_config(_config(upstream, api_key=wrong, api_key_env=None))
    try:
        with pytest.raises(BackendError) as info:
            await b.chat(chat_request("hi"))
        with pytest.raises(BackendError):
            await collect_chat(b, chat_request("hi"))
    finally:
        await b.aclose()
    error = info.value
    assert error.status_code == 502 and error.code == "upstream_auth_failed"
    assert wrong not in error.message and "operator" in error.message
    assert wrong not in json.dumps(error.to_openai())


async def test_missing_upstream_model_is_a_backend_error(upstream: str, key_env: None) -> None:
    b = OpenAIUpstreamBackend.from_config(_config(upstream, model="no-such-model"))
    try:
        with pytest.raises(BackendError, match="404"):
            await b.chat(chat_request("hi"))
    finally:
        await b.aclose()


async def test_persistent_503_retries_then_is_unavailable(upstream: str, key_env: None) -> None:
    before = _debug(upstream, "stats")["attempts"].get("503", 0)
    b = OpenAIUpstreamBackend.from_config(_config(upstream, max_retries=2))
    try:
        with pytest.raises(BackendUnavailableError):
            await b.chat(chat_request("TRIGGER_503"))
    finally:
        await b.aclose()
    assert _debug(upstream, "stats")["attempts"]["503"] - before == 3


async def test_transient_503_is_retried(backend: OpenAIUpstreamBackend, upstream: str) -> None:
    tag = secrets.token_hex(4)
    result = await backend.chat(chat_request(f"TRIGGER_503_ONCE:{tag} ok"))
    assert result.choices[0].message.content is not None
    assert _debug(upstream, "stats")["attempts"][tag] == 2


async def test_hanging_upstream_times_out_as_unavailable(upstream: str, key_env: None) -> None:
    b = OpenAIUpstreamBackend.from_config(_config(upstream, timeout_s=0.5))
    started = time.monotonic()
    try:
        with pytest.raises(BackendUnavailableError) as info:
            await b.chat(chat_request("TRIGGER_HANG"))
    finally:
        await b.aclose()
    assert info.value.code == "upstream_timeout"
    assert time.monotonic() - started < 3  # timeouts are not retried


async def test_stalled_stream_times_out_as_unavailable(upstream: str, key_env: None) -> None:
    b = OpenAIUpstreamBackend.from_config(_config(upstream, timeout_s=0.5))
    received: list[ChatCompletionChunk] = []
    try:
        with pytest.raises(BackendUnavailableError):
            async for chunk in b.chat_stream(chat_request("TRIGGER_STREAM_HANG")):
                received.append(chunk)
    finally:
        await b.aclose()
    assert len(received) == 1


async def test_error_event_mid_stream_is_a_backend_error(backend: OpenAIUpstreamBackend) -> None:
    with pytest.raises(BackendError, match="while streaming"):
        await collect_chat(backend, chat_request("TRIGGER_STREAM_ERROR"))


async def test_dropped_stream_is_a_backend_error(backend: OpenAIUpstreamBackend) -> None:
    with pytest.raises(BackendError):
        await collect_completion(backend, completion_request("TRIGGER_DROP " + "y" * 64))


async def test_server_down_is_unavailable(key_env: None) -> None:
    b = OpenAIUpstreamBackend.from_config(
        {"base_url": f"http://127.0.0.1:{_free_port()}/v1", "model": "m", "api_key": UPSTREAM_KEY, "max_retries": 1}
    )
    try:
        with pytest.raises(BackendUnavailableError) as info:
            await b.chat(chat_request("hi"))
        assert info.value.status_code == 503 and UPSTREAM_KEY not in info.value.message
        assert "127.0.0.1" not in info.value.message  # the operator's topology stays private
        with pytest.raises(BackendUnavailableError):
            await collect_chat(b, chat_request("hi"))
        with pytest.raises(BackendUnavailableError):
            await b.complete(completion_request("hi"))
    finally:
        await b.aclose()


async def test_abandoned_stream_closes_the_upstream_connection(backend: OpenAIUpstreamBackend, upstream: str) -> None:
    before = _debug(upstream, "stats")["abandoned_streams"]
    stream = backend.chat_stream(chat_request("TRIGGER_SLOW " + "z" * 200))
    async for _chunk in stream:
        break
    await stream.aclose()  # type: ignore[attr-defined]
    deadline = time.monotonic() + 5
    while _debug(upstream, "stats")["abandoned_streams"] == before and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert _debug(upstream, "stats")["abandoned_streams"] == before + 1


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"model": "m"}, "base_url"),
        ({"base_url": "ftp://x/v1", "model": "m"}, "http"),
        ({"base_url": "http://x/v1"}, "model"),
        ({"base_url": "http://x/v1", "model": "m", "api_key": "k", "api_key_env": "E"}, "not both"),
        ({"base_url": "http://x/v1", "model": "m", "extra_headers": {"authorization": "Bearer x"}}, "api_key"),
        ({"base_url": "http://x/v1", "model": "m", "timeout_s": 0}, "timeout_s"),
        ({"base_url": "http://x/v1", "model": "m", "api_kye": "k"}, "api_kye"),
    ],
)
def test_invalid_config_is_a_config_error(config: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        OpenAIUpstreamBackend.from_config(config)


def test_missing_key_env_var_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIRLOCK_TEST_NO_SUCH_KEY", raising=False)
    with pytest.raises(ConfigError, match="AIRLOCK_TEST_NO_SUCH_KEY"):
        OpenAIUpstreamBackend.from_config(
            {"base_url": "http://x/v1", "model": "m", "api_key_env": "AIRLOCK_TEST_NO_SUCH_KEY"}
        )


def test_key_never_appears_in_config_errors_or_repr() -> None:
    secret = "sk-" + secrets.token_hex(8)
    with pytest.raises(ConfigError) as info:
        OpenAIUpstreamBackend.from_config({"base_url": "http://x/v1", "model": "", "api_key": secret})
    assert secret not in str(info.value)
    b = OpenAIUpstreamBackend.from_config({"base_url": "http://x/v1/", "model": "m", "api_key": secret})
    assert secret not in repr(b) and secret not in repr(b.config)
    assert b.base_url == "http://x/v1"


@pytest.mark.parametrize(
    ("body", "finish", "has_usage"),
    [
        ({"usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}}, "stop", True),
        ({"finish": "eos_token"}, "stop", False),  # not the wire model's: normalised on the general path
        ({"usage": None}, "stop", False),
        ({}, "stop", False),
    ],
)
def test_answers_validate_the_same_on_either_path(body: dict[str, Any], finish: str, has_usage: bool) -> None:
    b = OpenAIUpstreamBackend.from_config({"base_url": "http://127.0.0.1:1/v1", "model": "m"})
    answer: dict[str, Any] = {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "text": "hi", "finish_reason": body.get("finish", "stop"), "logprobs": None}],
    }
    if "usage" in body:
        answer["usage"] = body["usage"]
    result, reported = b._answer(json.dumps(answer).encode(), Completion, "completion")
    assert result.choices[0].finish_reason == finish and result.choices[0].text == "hi"
    assert reported is has_usage
    for bad in (b"not json", b"[1]", json.dumps({**answer, "choices": "none"}).encode()):
        with pytest.raises(BackendError):
            b._answer(bad, Completion, "completion")
