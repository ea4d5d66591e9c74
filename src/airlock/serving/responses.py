"""``POST /v1/responses``: OpenAI's Responses API for text and function calls, served as a chat completion.

A Responses request is translated into the equivalent chat completion request (``instructions`` as
a system message, input items as messages, function tools and calls in chat's shapes,
``text.format`` as ``response_format``, ``max_output_tokens`` as the token budget), which then takes
the one sampling path: the resolver, the grant's scopes (``include`` of output logprobs needs
``logprobs``), quotas, the variant's mitigations, the backend's field checks, the audit event.
The answer is translated back into a ``response`` object, or, streamed, into the Responses event
stream (``response.created`` ... ``response.output_text.delta`` ... ``response.completed``).

Airlock stores no responses: ``previous_response_id`` and ``background`` are refused, and
``store`` has no effect (nothing is retrievable later). Fields this module does not model are
handed to the backend as chat fields, which forwards or refuses them (``docs/request-fields.md``).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, Literal

from pydantic import ConfigDict, Field, ValidationError, field_validator

from airlock.access.middleware import AuditContext
from airlock.backends.protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChoiceLogprobs,
    FinishReason,
    Usage,
    WireModel,
    new_id,
    now_ts,
)
from airlock.errors import AirlockError, InvalidRequestError
from airlock.serving.service import Target, account

__all__ = ["ResponsesRequest", "create_response", "stream_response", "to_chat_request"]

#: ``include`` values that only ask for what the answer carries anyway, or for logprobs.
_LOGPROBS_INCLUDE = "message.output_text.logprobs"


class ResponsesRequest(WireModel):
    """`POST /v1/responses` body: text and function tools (unmodelled fields go to the backend as chat fields)."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    model: str = Field(min_length=1, description="Model id, `{model}/{variant}` or `{model}@{version}/{variant}`.")
    input: str | list[dict[str, Any]] = Field(
        description="A text, or input items: messages, function calls and outputs."
    )
    instructions: str | None = Field(default=None, description="A system message placed before the input.")
    max_output_tokens: int | None = Field(default=None, ge=1, description="Token budget (capped by the variant).")
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    tools: list[dict[str, Any]] | None = Field(default=None, description="Function tools (`type: function`).")
    tool_choice: str | dict[str, Any] | None = Field(
        default=None, description="`none`, `auto`, `required` or a function."
    )
    parallel_tool_calls: bool | None = None
    stream: bool = False
    text: dict[str, Any] | None = Field(
        default=None, description="`{format: {type: text | json_object | json_schema}}`."
    )
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    include: list[str] | None = Field(default=None, description=f"Only `{_LOGPROBS_INCLUDE}` is supported.")
    store: bool | None = Field(default=None, description="Accepted; Airlock never stores responses.")
    metadata: dict[str, str] | None = Field(default=None, description="Echoed back; no effect on generation.")
    previous_response_id: str | None = Field(default=None, description="Refused: Airlock stores no responses.")
    background: bool | None = Field(default=None, description="Refused when true.")
    reasoning: dict[str, Any] | None = Field(default=None, description="Refused unless empty.")
    truncation: Literal["disabled"] | None = None
    user: str | None = None

    def extra_fields(self) -> dict[str, Any]:
        """Return the fields the client sent that this model does not model, as sent."""
        return dict(self.model_extra or {})

    @field_validator("include")
    @classmethod
    def _check_include(cls, value: list[str] | None) -> list[str] | None:
        for item in value or []:
            if item != _LOGPROBS_INCLUDE:
                raise ValueError(f"{item!r} is not supported; only {_LOGPROBS_INCLUDE!r}")
        return value


def _refuse(param: str, message: str) -> InvalidRequestError:
    return InvalidRequestError(message, code="unsupported_parameter", param=param)


def _text_of(content: Any, param: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequestError("content must be a string or a list of text parts", param=param)
    texts: list[str] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text") and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            texts.append(part["refusal"])
        else:
            raise _refuse(param, f"content part type {kind!r} is not supported; send text")
    return "".join(texts)


def _messages(body: ResponsesRequest) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    if body.instructions:
        messages.append({"role": "system", "content": body.instructions})
    if isinstance(body.input, str):
        messages.append({"role": "user", "content": body.input})
        return messages
    for i, item in enumerate(body.input):
        param = f"input.{i}"
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise InvalidRequestError(f"message role {role!r} is not supported", param=param)
            messages.append({"role": role, "content": _text_of(item.get("content"), param)})
        elif kind == "function_call":
            call = {
                "id": str(item.get("call_id") or item.get("id") or ""),
                "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments", "")},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and last.get("tool_calls") is not None:
                last["tool_calls"].append(call)  # parallel calls of one turn form one assistant message
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            text = output if isinstance(output, str) else _text_of(output, param)
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": text})
        else:
            raise _refuse(param, f"input item type {kind!r} is not supported; send messages and function calls")
    return messages


def _chat_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    if tools is None:
        return None
    out: list[dict[str, Any]] = []
    for i, tool in enumerate(tools):
        if tool.get("type") != "function":
            raise _refuse(f"tools.{i}", f"tool type {tool.get('type')!r} is not supported; offer function tools")
        function = {k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool}
        out.append({"type": "function", "function": function})
    return out


def _chat_tool_choice(choice: str | dict[str, Any] | None) -> Any:
    if isinstance(choice, dict):
        if choice.get("type") != "function":
            raise _refuse("tool_choice", f"tool_choice type {choice.get('type')!r} is not supported")
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


def _response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    fmt = (text or {}).get("format")
    if not isinstance(fmt, dict):
        return None
    if fmt.get("type") == "json_schema":
        schema = {k: fmt[k] for k in ("name", "description", "schema", "strict") if k in fmt}
        return {"type": "json_schema", "json_schema": schema}
    return {"type": fmt.get("type")}


_CHAT_TO_RESPONSES = {
    "messages": "input",
    "max_completion_tokens": "max_output_tokens",
    "response_format": "text",
    "logprobs": "include",
}


def to_chat_request(body: ResponsesRequest) -> ChatCompletionRequest:
    """Return the chat completion request that serves ``body`` (400 for what has no equivalent)."""
    if body.previous_response_id is not None:
        raise _refuse("previous_response_id", "Airlock stores no responses; send the whole conversation as input")
    if body.background:
        raise _refuse("background", "background responses are not supported")
    if body.reasoning:
        raise _refuse("reasoning", "reasoning options are not supported by these models")
    logprobs = bool(body.include) or bool(body.top_logprobs)
    fields: dict[str, Any] = {
        "model": body.model,
        "messages": _messages(body),
        "stream": body.stream,
        "tools": _chat_tools(body.tools),
        "tool_choice": _chat_tool_choice(body.tool_choice),
        "parallel_tool_calls": body.parallel_tool_calls,
        "response_format": _response_format(body.text),
        "max_completion_tokens": body.max_output_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "logprobs": logprobs or None,
        "top_logprobs": body.top_logprobs if logprobs else None,
        "user": body.user,
    }
    sent = {k: v for k, v in fields.items() if v is not None}
    try:
        return ChatCompletionRequest.model_validate({**body.extra_fields(), **sent})
    except ValidationError as exc:
        # Name the Responses field the client wrote, not the chat field it became.
        error = exc.errors(include_url=False, include_input=False)[0]
        loc = [str(p) for p in error["loc"]]
        head = _CHAT_TO_RESPONSES.get(loc[0], loc[0]) if loc else "input"
        param = ".".join([head, *loc[1:]]) if head != "input" else "input"
        raise InvalidRequestError(f"{param}: {error['msg']}", param=param) from None


# ---------------------------------------------------------------- the answer


def _logprobs(logprobs: ChoiceLogprobs | None) -> list[dict[str, Any]]:
    return [t.model_dump() for t in (logprobs.content or [])] if logprobs is not None else []


def _message_item(item_id: str, text: str, status: str, logprobs: list[dict[str, Any]]) -> dict[str, Any]:
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs}
    return {"id": item_id, "type": "message", "role": "assistant", "status": status, "content": [part]}


def _open_message(item_id: str) -> dict[str, Any]:
    return {"id": item_id, "type": "message", "role": "assistant", "status": "in_progress", "content": []}


def _call_item(call: dict[str, Any]) -> dict[str, Any]:
    function = call.get("function") or {}
    call_id = str(call.get("id") or new_id("call_"))
    return {
        "id": "fc_" + call_id.removeprefix("call_"),
        "type": "function_call",
        "status": "completed",
        "call_id": call_id,
        "name": function.get("name", ""),
        "arguments": function.get("arguments", ""),
    }


def _status(finish: FinishReason | None) -> tuple[str, dict[str, str] | None]:
    if finish == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    if finish == "content_filter":
        return "incomplete", {"reason": "content_filter"}
    return "completed", None


def _usage(usage: Usage | None) -> dict[str, Any] | None:
    if usage is None:
        return None
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.total_tokens,
    }


def _response(
    body: ResponsesRequest,
    response_id: str,
    created: int,
    status: str,
    output: list[dict[str, Any]],
    usage: Usage | None = None,
    incomplete: dict[str, str] | None = None,
) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "response",
        "created_at": created,
        "status": status,
        "error": None,
        "incomplete_details": incomplete,
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "model": body.model,
        "output": output,
        "parallel_tool_calls": body.parallel_tool_calls is not False,
        "previous_response_id": None,
        "reasoning": None,
        "store": False,
        "temperature": body.temperature,
        "text": body.text or {"format": {"type": "text"}},
        "tool_choice": body.tool_choice or "auto",
        "tools": body.tools or [],
        "top_p": body.top_p,
        "truncation": "disabled",
        "usage": _usage(usage),
        "user": body.user,
        "metadata": body.metadata or {},
    }


def _output(result: ChatCompletion) -> tuple[list[dict[str, Any]], FinishReason | None]:
    choice = result.choices[0]
    output: list[dict[str, Any]] = []
    message = choice.message
    if message.content or not message.tool_calls:
        status = "incomplete" if choice.finish_reason == "length" else "completed"
        output.append(_message_item(new_id("msg_"), message.content or "", status, _logprobs(choice.logprobs)))
    output += [_call_item(call) for call in message.tool_calls or []]
    return output, choice.finish_reason


async def create_response(
    target: Target, body: ResponsesRequest, chat: ChatCompletionRequest, audit: AuditContext
) -> dict[str, Any]:
    """Serve a whole response through the variant's pipeline; usage and verdicts go into the audit event."""
    screened = await target.backend.screened_chat(chat)
    result = screened.result
    account(audit, result.usage, screened.verdicts)
    output, finish = _output(result)
    status, incomplete = _status(finish)
    return _response(body, new_id("resp_"), result.created, status, output, result.usage, incomplete)


def _event(kind: str, sequence: int, **fields: Any) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, 'sequence_number': sequence, **fields})}\n\n"


async def stream_response(
    target: Target, body: ResponsesRequest, chat: ChatCompletionRequest, audit: AuditContext
) -> AsyncIterator[str]:
    """Serve a response as the Responses event stream, accounting usage from the final chunk.

    The first event is produced before the HTTP response starts (see routes), after the pipeline
    has begun, so errors before any token keep their status.
    """
    screened = target.backend.screened_chat_stream(chat)
    response_id, created = new_id("resp_"), now_ts()
    sequence = 0

    def event(kind: str, **fields: Any) -> str:
        nonlocal sequence
        sequence += 1
        return _event(kind, sequence - 1, **fields)

    chunks = screened.chunks
    usage: Usage | None = None
    text, logprobs = "", []
    calls: dict[int, dict[str, Any]] = {}
    finish: FinishReason | None = None
    message_id = new_id("msg_")
    opened = False
    started = False
    try:
        async for chunk in chunks:
            if not started:
                started = True
                yield event("response.created", response=_response(body, response_id, created, "in_progress", []))
                yield event("response.in_progress", response=_response(body, response_id, created, "in_progress", []))
            if isinstance(chunk, ChatCompletionChunk) and chunk.usage is not None and not chunk.choices:
                usage = chunk.usage
                continue
            for choice in chunk.choices:
                if choice.index != 0:
                    continue
                delta = choice.delta
                finish = choice.finish_reason or finish
                if delta.content:
                    if not opened:
                        opened = True
                        yield event("response.output_item.added", output_index=0, item=_open_message(message_id))
                        yield event(
                            "response.content_part.added",
                            item_id=message_id,
                            output_index=0,
                            content_index=0,
                            part={"type": "output_text", "text": "", "annotations": [], "logprobs": []},
                        )
                    new_logprobs = _logprobs(choice.logprobs)
                    text += delta.content
                    logprobs += new_logprobs
                    yield event(
                        "response.output_text.delta",
                        item_id=message_id,
                        output_index=0,
                        content_index=0,
                        delta=delta.content,
                        logprobs=new_logprobs,
                    )
                for call in delta.tool_calls or []:
                    merged = calls.setdefault(int(call.get("index", len(calls))), {"function": {"arguments": ""}})
                    if call.get("id"):
                        merged["id"] = call["id"]
                    function = call.get("function") or {}
                    if function.get("name"):
                        merged["function"]["name"] = function["name"]
                    merged["function"]["arguments"] += function.get("arguments") or ""
    except AirlockError as exc:
        if not started:
            raise  # nothing sent yet: the route turns it into a proper HTTP error status
        audit.error_code = exc.code
        audit.outcome = "error"
        error = exc.to_openai()["error"]
        yield event("error", code=error.get("code"), message=error.get("message"), param=error.get("param"))
        return
    finally:
        account(audit, usage, screened.verdicts)
    if not started:
        yield event("response.created", response=_response(body, response_id, created, "in_progress", []))
    output: list[dict[str, Any]] = []
    if opened or not calls:
        status = "incomplete" if finish == "length" else "completed"
        item = _message_item(message_id, text, status, logprobs)
        if not opened:
            yield event("response.output_item.added", output_index=0, item=_open_message(message_id))
        part = item["content"][0]
        yield event(
            "response.output_text.done",
            item_id=message_id,
            output_index=0,
            content_index=0,
            text=text,
            logprobs=logprobs,
        )
        yield event("response.content_part.done", item_id=message_id, output_index=0, content_index=0, part=part)
        yield event("response.output_item.done", output_index=0, item=item)
        output.append(item)
    for index in sorted(calls):
        item = _call_item(calls[index])
        position = len(output)
        yield event(
            "response.output_item.added", output_index=position, item={**item, "status": "in_progress", "arguments": ""}
        )
        yield event(
            "response.function_call_arguments.delta", item_id=item["id"], output_index=position, delta=item["arguments"]
        )
        yield event(
            "response.function_call_arguments.done",
            item_id=item["id"],
            output_index=position,
            name=item["name"],
            arguments=item["arguments"],
        )
        yield event("response.output_item.done", output_index=position, item=item)
        output.append(item)
    status, incomplete = _status(finish)
    final = _response(body, response_id, created, status, output, usage, incomplete)
    yield event("response.completed" if status == "completed" else "response.incomplete", response=final)
