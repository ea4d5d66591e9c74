"""Tool calling: the prompt format and parser, request validation, the local backend, the gateway, upstream."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import httpx
import openai
import pytest

from airlock.backends.base import ModelBackend
from airlock.backends.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
)
from airlock.backends.tools import (
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    ToolPlan,
    close_json_prefix,
    match_function,
    parse_generation,
    plan_tools,
    render_messages,
)
from airlock.mitigations import Verdict
from airlock.mitigations.pipeline import build_pipeline, chat_input_texts
from tests.conftest import HTTP_TIMEOUT, KEY_ENV, UPSTREAM_KEY, UPSTREAM_MODEL, Lab

if TYPE_CHECKING:
    from airlock.backends.local import LocalBackend

ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two integers.",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
USER = {"role": "user", "content": "What is 2 plus 3?"}


def request(**fields: Any) -> ChatCompletionRequest:
    body: dict[str, Any] = {"model": "m/v", "messages": [USER], "tools": [ADD, WEATHER]}
    body.update(fields)
    return ChatCompletionRequest.model_validate(body)


def call(name: str, arguments: dict[str, Any] | str, call_id: str = "call_1") -> dict[str, Any]:
    args = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}


AUTO = plan_tools(request())


# ---------------------------------------------------------------- parsing


def test_plain_text_is_content() -> None:
    parsed = parse_generation("The answer is 5.", AUTO)
    assert (parsed.content, parsed.tool_calls) == ("The answer is 5.", [])


def test_one_call_with_content_before_it() -> None:
    text = 'Let me add.\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
    parsed = parse_generation(text, AUTO)
    assert parsed.content == "Let me add."
    (only,) = parsed.tool_calls
    assert only["type"] == "function" and only["id"].startswith("call_")
    assert only["function"]["name"] == "add"
    assert json.loads(only["function"]["arguments"]) == {"a": 2, "b": 3}


def test_several_calls_whitespace_fences_and_a_missing_close_tag() -> None:
    text = (
        '  <tool_call>{"name":"add","arguments":{"a":1,"b":2}}</tool_call>\n\n'
        '<tool_call>\n```json\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}\n```\n</tool_call>'
        '<tool_call> {"name": "add", "parameters": {"a": 5, "b": 6}}'
    )
    parsed = parse_generation(text, AUTO)
    assert parsed.content is None
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed.tool_calls] == [
        ("add", {"a": 1, "b": 2}),
        ("get_weather", {"city": "Oslo"}),
        ("add", {"a": 5, "b": 6}),
    ]
    assert len({c["id"] for c in parsed.tool_calls}) == 3


def test_text_after_the_calls_is_dropped() -> None:
    text = '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 1}}</tool_call>\n<tool_response>2</tool_response>'
    parsed = parse_generation(text, AUTO)
    assert parsed.content is None and len(parsed.tool_calls) == 1


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        ("get_weather", "get_weather"),
        ("  add ", "add"),
        ("get_wether", "get_weather"),  # misspelt
        ("get_w", "get_weather"),  # cut short by the name budget
        ("ad", "add"),
        ("", "add"),  # nothing written: the first offered
        ("2 + 3", "add"),  # nothing alike: the first offered
    ],
)
def test_match_function_depends_on_the_written_text_only(written: str, expected: str) -> None:
    assert match_function(written, ["add", "get_weather"]) == expected


def test_match_function_breaks_ties_by_offer_order() -> None:
    assert match_function("ab", ["ax", "xb"]) == "ax"
    assert match_function("ab", ["xb", "ax"]) == "xb"
    with pytest.raises(ValueError, match="no function"):
        match_function("x", [])


@pytest.mark.parametrize(
    "block",
    [
        '{"name": "add", "arguments": {"a": 1,',  # unfinished JSON (not Airlock's own prefix: not repaired)
        "not json at all",
        '{"name": "delete_everything", "arguments": {}}',  # not an offered function
        '{"arguments": {"a": 1}}',  # no name
        '{"name": "add", "arguments": [1, 2]}',  # arguments must be an object
        '{"name": "add", "arguments": "{broken"}',
        '["add"]',
    ],
)
def test_an_invalid_block_leaves_everything_as_content(block: str) -> None:
    good = '<tool_call>{"name": "add", "arguments": {}}</tool_call>'
    text = f"{good}{TOOL_CALL_OPEN}{block}{TOOL_CALL_CLOSE}"
    parsed = parse_generation(text, AUTO)
    assert (parsed.content, parsed.tool_calls) == (text, [])


def test_no_tools_offered_means_no_parsing() -> None:
    text = '<tool_call>{"name": "add", "arguments": {}}</tool_call>'
    for plan in (ToolPlan(), plan_tools(request(tool_choice="none"))):
        assert parse_generation(text, plan).tool_calls == []


def test_parallel_tool_calls_false_keeps_the_first_call() -> None:
    plan = plan_tools(request(parallel_tool_calls=False))
    assert plan.stop_sequences() == [TOOL_CALL_CLOSE]
    assert "Call at most one function." in plan.system_block()
    text = '<tool_call>{"name": "add", "arguments": {}}</tool_call><tool_call>{"name": "add", "arguments": {}}'
    assert len(parse_generation(text, plan).tool_calls) == 1


def test_forced_call_is_repaired_and_named_by_the_plan() -> None:
    plan = plan_tools(request(tool_choice={"type": "function", "function": {"name": "add"}}))
    prefix = plan.generation_prefix()
    assert prefix == f'{TOOL_CALL_OPEN}{{"name": "add", "arguments": {{'
    assert plan.stop_sequences() == [TOOL_CALL_CLOSE]
    cases = {
        '"a": 2, "b": 3}}': {"a": 2, "b": 3},  # the model closed everything
        '"a": 2, "b": 3}': {"a": 2, "b": 3},  # forgot the outer brace
        '"a": 2, "b": 3': {"a": 2},  # cut off inside a number: the unsure member is dropped
        '"a": 2, "b": [1, {"c": "x': {"a": 2, "b": [1, {}]},
        "qwe asd zxc": {},  # garbage (a tiny random model)
        "": {},
        '"a": 1}, "name": "get_weather"}': {"a": 1},  # a second name cannot redirect a forced call
    }
    for generated, expected in cases.items():
        (forced,) = parse_generation(prefix + generated, plan).tool_calls
        assert forced["function"]["name"] == "add"
        assert json.loads(forced["function"]["arguments"]) == expected, generated
    # Text that did not start with Airlock's prefix must name the forced function itself.
    other = '<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>'
    assert parse_generation(other, plan).tool_calls == []
    assert len(parse_generation(other.replace("get_weather", "add"), plan).tool_calls) == 1


def test_required_with_one_tool_is_forced() -> None:
    plan = plan_tools(request(tools=[ADD], tool_choice="required"))
    assert plan.forced == "add" and plan.mode == "required"
    assert "You must call at least one function now." in plan.system_block()
    several = plan_tools(request(tool_choice="required"))
    assert several.forced is None
    assert several.generation_prefix() == f'{TOOL_CALL_OPEN}{{"name": "'
    parsed = parse_generation(several.generation_prefix() + 'get_weather", "arguments": {"city": "Ro', several)
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in parsed.tool_calls] == [("get_weather", "{}")]
    invented = several.generation_prefix() + '2 + 3", "arguments": {}}'
    assert parse_generation(invented, several).tool_calls == []


@pytest.mark.parametrize(
    ("text", "closed"),
    [
        ("{}", "{}"),
        ("{", "{}"),
        ('{"a": 1, "b": [tr', '{"a": 1, "b": []}'),
        (
            '{"a": "x\\"y", "b": {"c": null, "d": [1.5e3, false]}}',
            '{"a": "x\\"y", "b": {"c": null, "d": [1.5e3, false]}}',
        ),
        ('{"a": "unterminated', "{}"),
        ('{"a": 1,', '{"a": 1}'),
        ('{"a" 1}', "{}"),
        ('{"a": 1} trailing', '{"a": 1}'),
        ('{"a": [1, 2,', '{"a": [1, 2]}'),
        ('{"a": "bad \\q escape"}', "{}"),
        ("  \n{ }", "  \n{ }"),
        ("[1, 2]", None),
        ("garbage", None),
        ("", None),
    ],
)
def test_close_json_prefix(text: str, closed: str | None) -> None:
    assert close_json_prefix(text) == closed
    if closed is not None:
        json.loads(closed)


# ---------------------------------------------------------------- rendering


def test_schema_goes_into_the_system_prompt() -> None:
    rendered = render_messages(request().messages, AUTO)
    assert [m["role"] for m in rendered] == ["system", "user"]
    system = rendered[0]["content"]
    assert "<tools>" in system and "</tools>" in system and "<tool_call>" in system
    assert json.dumps({"type": "function", "function": ADD["function"]}) in system
    assert '"get_weather"' in system


def test_client_system_message_keeps_its_text_first() -> None:
    req = request(messages=[{"role": "developer", "content": "Be terse."}, USER])
    rendered = render_messages(req.messages, plan_tools(req))
    assert rendered[0]["role"] == "system" and rendered[0]["content"].startswith("Be terse.\n\n# Tools")
    assert len(rendered) == 2


def test_tool_choice_none_offers_no_tools() -> None:
    req = request(tool_choice="none")
    assert not plan_tools(req).active
    assert render_messages(req.messages, plan_tools(req)) == [USER]


def test_history_with_calls_and_results_renders_as_text() -> None:
    req = request(
        messages=[
            USER,
            {"role": "assistant", "content": "Adding.", "tool_calls": [call("add", {"a": 2, "b": 3}, "c1")]},
            {"role": "tool", "tool_call_id": "c1", "content": "5"},
            {"role": "assistant", "content": None, "tool_calls": [call("get_weather", "not json", "c2")]},
            {"role": "tool", "tool_call_id": "c2", "content": "sunny"},
            {"role": "tool", "tool_call_id": "c2", "content": "windy"},
        ],
        tool_choice="none",
    )
    rendered = render_messages(req.messages, plan_tools(req))
    assert rendered == [
        USER,
        {
            "role": "assistant",
            "content": 'Adding.\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>',
        },
        {"role": "user", "content": "<tool_response>\n5\n</tool_response>"},
        {"role": "assistant", "content": '<tool_call>\n{"name": "get_weather", "arguments": "not json"}\n</tool_call>'},
        {
            "role": "user",
            "content": "<tool_response>\nsunny\n</tool_response>\n<tool_response>\nwindy\n</tool_response>",
        },
    ]


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"tools": [{"type": "function"}]}, "tools[0].function: Field required"),
        ({"tools": [{"type": "retrieval", "function": ADD["function"]}]}, "tools[0].type"),
        ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools[0].function.name"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, "parameters"),
        ({"tools": [ADD, ADD]}, "offered twice"),
        ({"tools": "add"}, "list"),
        ({"tool_choice": "sometimes"}, "must be 'none', 'auto', 'required'"),
        ({"tool_choice": {"type": "function", "function": {"name": "sub"}}}, "'sub', which is not among"),
        ({"tool_choice": {"type": "function"}}, "tool_choice.function"),
        ({"tools": None, "tool_choice": "required"}, "'required' needs tools"),
        ({"messages": [{"role": "tool", "content": "5"}]}, "needs the tool_call_id"),
        ({"messages": [{"role": "user", "content": "x", "tool_calls": [call("add", {})]}]}, "only assistant"),
        ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function"}]}]}, "tool_calls[0]"),
        ({"messages": [{"role": "assistant", "tool_calls": [call("add", {}, "")]}]}, "tool_calls[0].id"),
        (
            {
                "messages": [
                    {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": {}}}]}
                ]
            },
            "arguments",
        ),
    ],
)
def test_bad_tool_fields_are_rejected(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        request(**fields)


def test_valid_tool_fields_are_kept_verbatim() -> None:
    tool = {"type": "function", "function": {**ADD["function"], "strict": True, "x-vendor": 1}}
    req = request(tools=[tool], tool_choice={"type": "function", "function": {"name": "add"}})
    assert req.tools == [tool]  # forwarded upstream as sent
    assert (req.tool_mode(), req.forced_function()) == ("function", "add")
    assert request(tools=[]).tool_mode() == "none"
    assert request(tool_choice=None).tool_mode() == "auto"
    assert request(tools=None, tool_choice="none").tool_mode() == "none"


def test_stream_deltas_get_an_index() -> None:
    delta = ChatDelta(tool_calls=[call("add", {}), call("add", {}, "call_2")])
    assert [c["index"] for c in delta.tool_calls or []] == [0, 1]


# ---------------------------------------------------------------- local backend (tiny-random)


async def test_prompt_holds_the_schema_and_the_forced_prefix(tiny_backend: LocalBackend) -> None:
    forced = request(tool_choice={"type": "function", "function": {"name": "get_weather"}})
    text = tiny_backend.tokenizer.decode(tiny_backend._chat_prompt(forced.messages, plan_tools(forced)))
    assert "<tools>" in text and '"get_weather"' in text and "You must call the function 'get_weather' now." in text
    assert text.endswith('<|im_start|>assistant\n<tool_call>{"name": "get_weather", "arguments": {')
    none = request(tool_choice="none")
    plain = tiny_backend.tokenizer.decode(tiny_backend._chat_prompt(none.messages, plan_tools(none)))
    assert "<tools>" not in plain and plain.endswith("<|im_start|>assistant\n")


async def test_tiny_model_forced_call_has_valid_arguments(tiny_backend: LocalBackend) -> None:
    for max_tokens, temperature in ((1, 0.0), (40, 0.0), (40, 1.0)):
        req = request(
            tool_choice={"type": "function", "function": {"name": "add"}},
            max_tokens=max_tokens,
            temperature=temperature,
            seed=7,
            n=2,
            logprobs=True,
        )
        result = await tiny_backend.chat(req)
        for choice in result.choices:
            (forced,) = choice.message.tool_calls or []
            assert forced["function"]["name"] == "add" and forced["id"].startswith("call_")
            assert isinstance(json.loads(forced["function"]["arguments"]), dict)
            assert choice.message.content is None
            assert choice.finish_reason in ("tool_calls", "length")
            assert choice.logprobs is not None  # of the generated tokens
        assert result.usage.completion_tokens <= 2 * max_tokens


async def test_tiny_model_required_picks_an_offered_function(tiny_backend: LocalBackend) -> None:
    result = await tiny_backend.chat(request(tool_choice="required", max_tokens=8, temperature=0))
    (chosen,) = result.choices[0].message.tool_calls or []
    assert chosen["function"]["name"] in {"add", "get_weather"}
    assert isinstance(json.loads(chosen["function"]["arguments"]), dict)


async def test_required_choice_is_the_sampled_name_not_a_logprob_ranking(
    tiny_backend: LocalBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    from airlock.backends.protocol import CompletionRequest

    names = ["add", "lookup_city_population", "get_weather"]
    offered = [ADD, {"type": "function", "function": {"name": names[1]}}, WEATHER]
    req = request(tools=offered, tool_choice="required", max_tokens=6, temperature=0)
    plan = plan_tools(req)
    # What the model writes, greedily, where the name goes: a plain completion of the same prompt.
    prompt = tiny_backend._chat_prompt(req.messages, plan)
    budget = max(tiny_backend.count_tokens(name) for name in names) + 2  # the name's budget: longest + quote
    free = await tiny_backend.complete(
        CompletionRequest(model="m/v", prompt=prompt, max_tokens=budget, temperature=0, stop=['"'])
    )
    written = free.choices[0].text
    expected = match_function(written, names)

    async def no_scoring(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("choosing the function must not score prompts")

    monkeypatch.setattr(tiny_backend, "complete", no_scoring)
    result = await tiny_backend.chat(req)
    (chosen,) = result.choices[0].message.tool_calls or []
    assert chosen["function"]["name"] == expected != names[0]  # a match, not the fallback to the first
    assert isinstance(json.loads(chosen["function"]["arguments"]), dict)


async def test_tiny_model_auto_and_history(tiny_backend: LocalBackend) -> None:
    # A random model writes no call: the answer is plain content, as generated.
    auto = await tiny_backend.chat(request(max_tokens=6, temperature=0))
    assert auto.choices[0].message.tool_calls is None and auto.choices[0].message.content
    follow_up = request(
        messages=[
            USER,
            {"role": "assistant", "content": None, "tool_calls": [call("add", {"a": 2, "b": 3}, "c1")]},
            {"role": "tool", "tool_call_id": "c1", "content": "5"},
        ],
        max_tokens=3,
        temperature=0,
    )
    assert (await tiny_backend.chat(follow_up)).usage.completion_tokens == 3


async def test_tiny_model_streamed_tool_call(tiny_backend: LocalBackend) -> None:
    req = request(tool_choice={"type": "function", "function": {"name": "add"}}, max_tokens=12, temperature=0)
    full = await tiny_backend.chat(req)
    chunks: list[ChatCompletionChunk] = [
        c async for c in tiny_backend.chat_stream(req.model_copy(update={"stream": True}))
    ]
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [d for c in chunks for ch in c.choices for d in ch.delta.tool_calls or []]
    (delta,) = deltas
    expected = (full.choices[0].message.tool_calls or [])[0]
    assert delta["index"] == 0 and delta["type"] == "function" and delta["id"].startswith("call_")
    assert delta["function"] == expected["function"]
    finishes = [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage


# ---------------------------------------------------------------- mitigations see tool calls


class ToolCallingBackend(ModelBackend):
    """Answers every chat with one tool call whose arguments are the last user message."""

    kind = "tool-fake"

    async def chat(self, request: ChatCompletionRequest) -> ChatCompletion:
        args = json.dumps({"text": request.messages[-1].text()})
        return ChatCompletion(
            model=request.model,
            choices=[
                ChatChoice(
                    index=0,
                    message=AssistantMessage(content=None, tool_calls=[call("add", args)]),
                    finish_reason="tool_calls",
                )
            ],
        )


async def test_output_filter_sees_tool_call_arguments() -> None:
    pipeline = build_pipeline(
        ToolCallingBackend(),
        [{"name": "out", "kind": "output_filter", "config": {"patterns": ["CANARY"], "classifier": "none"}}],
    )
    verdicts: list[Verdict] = []
    results = []
    for content in ("fine", "leak CANARY"):
        screened = await pipeline.screened_chat(request(messages=[{"role": "user", "content": content}]))
        results.append(screened.result)
        verdicts += screened.verdicts
    ok, blocked = results
    stream = pipeline.screened_chat_stream(request(messages=[{"role": "user", "content": "CANARY"}]))
    streamed = [c async for c in stream.chunks]
    verdicts += stream.verdicts
    assert ok.choices[0].message.tool_calls and ok.choices[0].finish_reason == "tool_calls"
    assert blocked.choices[0].finish_reason == "content_filter" and blocked.choices[0].message.tool_calls is None
    assert [v.blocked for v in verdicts] == [False, True, True]
    assert streamed[0].choices[0].finish_reason == "content_filter"


def test_input_screening_includes_tool_calls_and_results() -> None:
    req = request(
        messages=[
            USER,
            {"role": "assistant", "tool_calls": [call("add", {"a": "zyloxin"}, "c1")]},
            {"role": "tool", "tool_call_id": "c1", "content": "result text"},
        ]
    )
    texts = chat_input_texts(req)
    assert 'add {"a": "zyloxin"}' in texts and "result text" in texts


# ---------------------------------------------------------------- through the gateway (fake backend)


def client(lab: Lab, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=lab.url + "/v1", api_key=key, max_retries=0)


def _post(lab: Lab, key: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(
        f"{lab.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=HTTP_TIMEOUT
    )


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools"),
        ({"tools": {"add": ADD}}, "tools"),
        ({"tools": [ADD], "tool_choice": {"type": "function", "function": {"name": "sub"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"messages": [USER, {"role": "tool", "content": "5"}]}, "messages"),
    ],
)
def test_bad_tool_requests_are_400(lab: Lab, fields: dict[str, Any], param: str) -> None:
    _gid, key = lab.grant()
    resp = _post(lab, key, {"model": "m1/helpful-only", "messages": [USER], **fields})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param


def test_tool_round_trip_with_the_openai_sdk(lab: Lab) -> None:
    _gid, key = lab.grant()
    c = client(lab, key)
    first = c.chat.completions.create(
        model="m1/helpful-only",
        messages=[{"role": "user", "content": 'CALL add {"a": 2, "b": 3}'}],
        tools=[ADD],  # type: ignore[list-item]
        tool_choice="auto",
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    tool_call = choice.message.tool_calls[0]
    assert tool_call.function.name == "add" and json.loads(tool_call.function.arguments) == {"a": 2, "b": 3}  # type: ignore[union-attr]
    second = c.chat.completions.create(
        model="m1/helpful-only",
        messages=[
            {"role": "user", "content": 'CALL add {"a": 2, "b": 3}'},
            choice.message.model_dump(exclude_none=True),  # type: ignore[list-item]
            {"role": "tool", "tool_call_id": tool_call.id, "content": "5"},
        ],
        tools=[ADD],  # type: ignore[list-item]
    )
    assert second.choices[0].message.content == "echo: tool result: 5"


def test_streamed_tool_calls_accumulate_with_the_openai_sdk(lab: Lab) -> None:
    _gid, key = lab.grant()
    with client(lab, key).chat.completions.stream(
        model="m1/helpful-only",
        messages=[{"role": "user", "content": "anything"}],
        tools=[ADD],  # type: ignore[list-item]
        tool_choice={"type": "function", "function": {"name": "add"}},
    ) as stream:
        for _event in stream:
            pass
        final = stream.get_final_completion()
    tool_calls = final.choices[0].message.tool_calls or []
    assert [(t.function.name, t.function.arguments) for t in tool_calls] == [("add", "{}")]  # type: ignore[union-attr]
    assert final.choices[0].finish_reason == "tool_calls"


def test_production_filters_screen_tool_traffic(lab: Lab) -> None:
    _gid, key = lab.grant()
    c = client(lab, key)
    # Output filter: a call whose arguments hold the canary is replaced by a refusal.
    out = c.chat.completions.create(
        model="m1/production",
        messages=[{"role": "user", "content": 'CALL add {"a": "CANARY"}'}],
        tools=[ADD],  # type: ignore[list-item]
    )
    assert out.choices[0].finish_reason == "content_filter" and not out.choices[0].message.tool_calls
    # Input filter: disallowed text in a past call's arguments is refused before the model runs.
    refused = c.chat.completions.create(
        model="m1/production",
        messages=[
            USER,
            {"role": "assistant", "tool_calls": [call("add", {"a": "zyloxin"})]},
            {"role": "tool", "tool_call_id": "call_1", "content": "5"},
        ],  # type: ignore[list-item]
        tools=[ADD],  # type: ignore[list-item]
    )
    assert refused.choices[0].finish_reason == "content_filter"


# ---------------------------------------------------------------- upstream backend


@pytest.fixture
async def upstream_backend(upstream: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Any]:
    from airlock.backends.openai_upstream import OpenAIUpstreamBackend

    monkeypatch.setenv(KEY_ENV, UPSTREAM_KEY)
    backend = OpenAIUpstreamBackend.from_config(
        {"base_url": f"{upstream}/v1", "model": UPSTREAM_MODEL, "api_key_env": KEY_ENV, "timeout_s": 10}
    )
    await backend.start()
    try:
        yield backend
    finally:
        await backend.aclose()


async def test_upstream_forwards_tool_fields_verbatim(upstream: str, upstream_backend: Any) -> None:
    tool = {"type": "function", "function": {**ADD["function"], "strict": True}}
    messages = [
        USER,
        {"role": "assistant", "content": None, "tool_calls": [call("add", {"a": 2, "b": 3}, "c1")]},
        {"role": "tool", "tool_call_id": "c1", "content": "5"},
    ]
    req = ChatCompletionRequest.model_validate(
        {
            "model": "acme/production",
            "messages": messages,
            "tools": [tool],
            "tool_choice": {"type": "function", "function": {"name": "add"}},
            "parallel_tool_calls": False,
        }
    )
    await upstream_backend.chat(req)
    with urllib.request.urlopen(f"{upstream}/_debug/requests", timeout=5) as response:
        body = json.loads(response.read())[-1]["body"]
    assert body["model"] == UPSTREAM_MODEL
    assert body["tools"] == [tool]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "add"}}
    assert body["parallel_tool_calls"] is False
    assert body["messages"][1]["tool_calls"] == messages[1]["tool_calls"]  # type: ignore[index]
    assert body["messages"][2] == {"role": "tool", "content": "5", "tool_call_id": "c1"}


# ---------------------------------------------------------------- the real SmolLM2


@pytest.mark.slow
async def test_smollm2_forced_and_required_calls(smol_backend: LocalBackend) -> None:
    forced = await smol_backend.chat(
        request(tool_choice={"type": "function", "function": {"name": "add"}}, max_tokens=48, temperature=0)
    )
    (call_add,) = forced.choices[0].message.tool_calls or []
    assert call_add["function"]["name"] == "add"
    assert isinstance(json.loads(call_add["function"]["arguments"]), dict)
    required = await smol_backend.chat(request(tool_choice="required", max_tokens=48, temperature=0))
    (chosen,) = required.choices[0].message.tool_calls or []
    assert chosen["function"]["name"] in {"add", "get_weather"}
    assert isinstance(json.loads(chosen["function"]["arguments"]), dict)
