"""Logits processors on the local backend: logit bias, penalties and JSON-constrained decoding, in a batch."""

from __future__ import annotations

import asyncio
import json

import pytest

from airlock.backends.local import LocalBackend
from airlock.backends.protocol import ChatCompletionRequest
from airlock.errors import InvalidRequestError
from tests.backends.local.helpers import chat, chat_ids, forward_logprobs, text_of

ENUM_SCHEMA = {
    "type": "object",
    "properties": {"answer": {"enum": ["yes", "no"]}},
    "required": ["answer"],
    "additionalProperties": False,
}


def _json_format(schema: dict[str, object]) -> dict[str, object]:
    return {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema, "strict": True}}


async def test_logit_bias_forces_and_bans_tokens(tiny_backend: LocalBackend) -> None:
    ids = chat_ids(tiny_backend, "Hello there!")
    greedy = int(forward_logprobs(tiny_backend, ids)[-1].argmax())
    forced = (greedy + 1) % 1000
    result = await tiny_backend.chat(chat(max_tokens=3, logit_bias={str(forced): 100}, logprobs=True))
    tokens = result.choices[0].logprobs.content  # type: ignore[union-attr]
    assert tokens is not None and len(tokens) == 3
    assert all(t.token == tiny_backend._table().text(forced) for t in tokens)
    # Log-probabilities stay the model's raw distribution, not the biased one.
    assert tokens[0].logprob == pytest.approx(float(forward_logprobs(tiny_backend, ids)[-1][forced]), abs=1e-3)
    banned = await tiny_backend.chat(chat(max_tokens=1, logit_bias={str(greedy): -100}, logprobs=True))
    first = banned.choices[0].logprobs.content[0]  # type: ignore[index,union-attr]
    assert first.token != tiny_backend._table().text(greedy)
    with pytest.raises(InvalidRequestError, match="outside this model's vocabulary"):
        await tiny_backend.chat(chat(logit_bias={"999999": 5}))


async def test_frequency_penalty_stops_repetition(tiny_backend: LocalBackend) -> None:
    plain = await tiny_backend.chat(chat(max_tokens=24, logprobs=True))
    penalised = await tiny_backend.chat(chat(max_tokens=24, logprobs=True, frequency_penalty=2.0, presence_penalty=2.0))

    def distinct(result: object) -> int:
        return len({t.token for t in result.choices[0].logprobs.content})  # type: ignore[attr-defined]

    assert distinct(penalised) >= distinct(plain)
    assert distinct(penalised) > 20  # a random model repeats itself; penalised, almost never


async def test_json_schema_is_enforced_while_batched_with_plain_rows(tiny_backend: LocalBackend) -> None:
    alone = text_of(await tiny_backend.chat(chat(max_tokens=12)))
    constrained = chat(max_tokens=40, response_format=_json_format(ENUM_SCHEMA), n=2, temperature=1.0, seed=3)
    plain = chat(max_tokens=12)
    both = await asyncio.gather(tiny_backend.chat(constrained), tiny_backend.chat(plain))
    for choice in both[0].choices:
        assert choice.finish_reason == "stop", choice
        assert json.loads(choice.message.content or "")["answer"] in ("yes", "no")
    assert text_of(both[1]) == alone  # the plain row of the same batch is unaffected
    obj = await tiny_backend.chat(chat(max_tokens=60, response_format={"type": "json_object"}, temperature=0.0))
    text = text_of(obj)
    assert text.startswith("{")
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


async def test_response_format_refusals(tiny_backend: LocalBackend) -> None:
    bad = chat(response_format=_json_format({"type": "object", "properties": {"a": {"type": "no-such-type"}}}))
    with pytest.raises(InvalidRequestError) as info:
        await tiny_backend.chat(bad)
    assert info.value.param == "response_format"
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    body = {"model": "t", "messages": [{"role": "user", "content": "x"}], "tools": tools}
    with_tools = ChatCompletionRequest.model_validate({**body, "response_format": {"type": "json_object"}})
    with pytest.raises(InvalidRequestError, match="response_format with tools"):
        tiny_backend.check_request(with_tools)
    with pytest.raises(InvalidRequestError) as unknown:
        tiny_backend.check_request(chat(top_k=3))
    assert unknown.value.code == "unsupported_parameter" and unknown.value.param == "top_k"
