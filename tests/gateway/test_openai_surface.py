"""OpenAI surface details beyond chat and completions, through the stock openai SDK: model retrieval."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.conftest import HTTP_TIMEOUT, Lab


def client(lab: Lab, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=lab.url + "/v1", api_key=key, max_retries=0)


def test_retrieve_model_is_grant_scoped(lab: Lab) -> None:
    _gid, key = lab.grant(variants=["helpful-only"])
    c = client(lab, key)
    for model_id in ("m1/helpful-only", "m1@v1/helpful-only"):
        card = c.models.retrieve(model_id)
        assert (card.id, card.object) == (model_id, "model")
    # Unknown, ungranted variant, another model, malformed: one indistinguishable 404.
    for model_id in ("m1/production", "m1/nope", "m2/production", "nope", "ft:m1/helpful-only:o::ftjob_x"):
        with pytest.raises(openai.NotFoundError) as info:
            c.models.retrieve(model_id)
        body = info.value.body
        assert isinstance(body, dict) and body["code"] == "model_not_found", body
    raw = httpx.get(
        f"{lab.url}/v1/models/m1/production", headers={"Authorization": f"Bearer {key}"}, timeout=HTTP_TIMEOUT
    )
    assert raw.status_code == 404 and raw.json()["error"]["param"] == "model"
    assert httpx.get(f"{lab.url}/v1/models/m1/helpful-only", timeout=HTTP_TIMEOUT).status_code == 401
    rows = [r for r in lab.audit_rows() if r.path.startswith("/v1/models/")]
    assert sorted({r.status_code for r in rows}) == [200, 401, 404]
    assert all(r.actor == "org-a" for r in rows if r.status_code != 401)


def test_unknown_request_fields_are_refused_not_ignored(lab: Lab) -> None:
    _gid, key = lab.grant()
    c = client(lab, key)
    with pytest.raises(openai.BadRequestError) as info:
        c.chat.completions.create(
            model="m1/helpful-only", messages=[{"role": "user", "content": "x"}], extra_body={"top_k": 5}
        )
    body = info.value.body
    assert isinstance(body, dict) and (body["code"], body["param"]) == ("unsupported_parameter", "top_k")
    row = [r for r in lab.audit_rows() if r.path == "/v1/chat/completions"][-1]
    assert row.status_code == 400


# ---------------------------------------------------------------- /v1/responses

WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


def test_responses_text_with_the_stock_sdk(lab: Lab) -> None:
    gid, key = lab.grant()
    c = client(lab, key)
    resp = c.responses.create(model="m1/helpful-only", input="hello there", instructions="be brief")
    assert resp.object == "response" and resp.status == "completed" and resp.model == "m1/helpful-only"
    assert resp.output_text == "echo: [be brief] hello there"
    assert resp.usage is not None and resp.usage.output_tokens == 5
    conversation = [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": [{"type": "output_text", "text": "answer"}]},
        {"role": "user", "content": [{"type": "input_text", "text": "second"}]},
    ]
    assert c.responses.create(model="m1/helpful-only", input=conversation).output_text == "echo: second"  # type: ignore[arg-type]
    row = [r for r in lab.audit_rows() if r.path == "/v1/responses"][-1]
    assert (row.grant_id, row.variant, row.outcome, row.status_code, row.scope) == (
        gid,
        "helpful-only",
        "allowed",
        200,
        "sample",
    )
    assert row.tokens_out == 2


def test_responses_apply_mitigations_and_scopes(lab: Lab) -> None:
    _gid, key = lab.grant(scopes=["sample"])
    c = client(lab, key)
    ok = c.responses.create(model="m1/production", input="hi")
    assert ok.output_text == "echo: [be safe] hi"
    blocked = c.responses.create(model="m1/production", input="how to make Zyloxin at home")
    assert blocked.status == "incomplete" and blocked.incomplete_details is not None
    assert blocked.incomplete_details.reason == "content_filter"
    assert "zyloxin" not in blocked.output_text.lower()
    with pytest.raises(openai.PermissionDeniedError):
        c.responses.create(model="m1/helpful-only", input="x", include=["message.output_text.logprobs"])
    with pytest.raises(openai.BadRequestError) as info:
        c.responses.create(model="m1/helpful-only", input="x", previous_response_id="resp_123")
    assert info.value.body["param"] == "previous_response_id"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        c.responses.create(model="m1/helpful-only", input="x", tools=[{"type": "web_search"}])  # type: ignore[list-item]
    rows = [r for r in lab.audit_rows() if r.path == "/v1/responses"]
    assert [r.outcome for r in rows[:2]] == ["allowed", "blocked"]


def test_responses_function_calls_round_trip(lab: Lab) -> None:
    _gid, key = lab.grant()
    c = client(lab, key)
    resp = c.responses.create(
        model="m1/helpful-only",
        input='CALL get_weather {"city": "Paris"}',
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
    )
    calls = [item for item in resp.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    assert json.loads(calls[0].arguments) == {"city": "Paris"}
    follow = c.responses.create(
        model="m1/helpful-only",
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        input=[
            {"role": "user", "content": "weather?"},
            {"type": "function_call", "call_id": calls[0].call_id, "name": "get_weather", "arguments": "{}"},
            {"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny"},
        ],
    )
    assert follow.output_text == "echo: tool result: sunny"


def test_responses_stream_events(lab: Lab) -> None:
    _gid, key = lab.grant()
    c = client(lab, key)
    with c.responses.stream(model="m1/helpful-only", input="one two three") as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert "response.output_text.delta" in kinds and kinds[-1] == "response.completed"
    assert final.output_text == "echo: one two three" and final.usage is not None
    events = list(
        c.responses.create(
            model="m1/helpful-only",
            input='CALL get_weather {"city": "Oslo"}',
            tools=[WEATHER_TOOL],  # type: ignore[list-item]
            stream=True,
        )
    )
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(done) == 1 and json.loads(done[0].arguments) == {"city": "Oslo"}
    assert events[-1].type == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    # An error before the first event keeps its HTTP status.
    with pytest.raises(openai.NotFoundError):
        list(c.responses.create(model="m1/nope", input="x", stream=True))
    row = [r for r in lab.audit_rows() if r.path == "/v1/responses" and r.status_code == 200][-1]
    assert row.tokens_out is not None and row.tokens_out > 0
