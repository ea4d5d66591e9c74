"""Every request field is supported, forwarded or refused, and the docs' table says which, per backend."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from airlock.backends.base import ModelBackend, render_field_table
from airlock.backends.local import LocalBackend
from airlock.backends.openai_upstream import CONTROLLED_FIELDS, OpenAIUpstreamBackend, UpstreamConfig
from airlock.backends.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest
from airlock.errors import InvalidRequestError

DOC = Path(__file__).resolve().parents[2] / "docs" / "request-fields.md"


def _section(name: str) -> str:
    match = re.search(f"<!-- {name}:start -->\n(.*?)<!-- {name}:end -->", DOC.read_text(), re.S)
    assert match, f"docs/request-fields.md lost its {name} markers"
    return match.group(1)


def test_docs_table_is_the_backends_declarations() -> None:
    assert _section("field-table") == render_field_table([LocalBackend, OpenAIUpstreamBackend])
    assert _section("controlled-fields") == "".join(f"- `{k}`: {v}\n" for k, v in sorted(CONTROLLED_FIELDS.items()))


def test_local_backend_declares_every_field() -> None:
    fields = set(ChatCompletionRequest.model_fields) | set(CompletionRequest.model_fields)
    assert fields == set(LocalBackend.field_notes)
    assert "**undeclared**" not in render_field_table([LocalBackend])


def _chat(**extra: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "m/v", "messages": [{"role": "user", "content": "hi"}], **extra}
    )


def test_unknown_fields_are_kept_and_refused_by_default() -> None:
    request = _chat(top_k=5, guided_json={"type": "object"})
    assert request.extra_fields() == {"top_k": 5, "guided_json": {"type": "object"}}
    with pytest.raises(InvalidRequestError) as info:
        ModelBackend().check_request(request)
    assert info.value.code == "unsupported_parameter" and info.value.param == "top_k"
    ModelBackend().check_request(_chat(temperature=0.5))


def test_upstream_forwards_unknown_fields_but_not_controlled_ones() -> None:
    backend = OpenAIUpstreamBackend(UpstreamConfig(base_url="http://127.0.0.1:9/v1", model="served"))
    request = _chat(top_k=5, structured_outputs={"json": {"type": "object"}}, stream_options={"include_usage": False})
    backend.check_request(request)
    body = json.loads(backend._payload(request, stream=True))
    assert body["top_k"] == 5 and body["structured_outputs"] == {"json": {"type": "object"}}
    assert body["model"] == "served" and body["stream"] is True and body["stream_options"] == {"include_usage": True}
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    assert json.loads(backend._payload(_chat(response_format=schema), stream=False))["response_format"] == schema
    for name in CONTROLLED_FIELDS:
        with pytest.raises(InvalidRequestError) as info:
            backend.check_request(_chat(**{name: "x"}))
        assert info.value.param == name


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"response_format": {"type": "xml"}}, "response_format"),
    ],
)
def test_bad_field_values_are_refused(extra: dict[str, object], param: str) -> None:
    with pytest.raises(ValueError, match=param):
        _chat(**extra)


def test_messages_keep_no_unknown_fields() -> None:
    assert not hasattr(ChatMessage.model_validate({"role": "user", "content": "x", "zzz": 1}), "zzz")
