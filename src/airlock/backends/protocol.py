"""OpenAI wire models shared by the gateway and the backends, all on one base model.

Every field Airlock acts on is validated here, so a bad value is a 400 before any backend runs.
Sampling requests keep the fields they do not model (``extra_fields``): a backend either forwards
them (an OpenAI-compatible upstream: vLLM's ``top_k``, guided decoding, ...) or refuses them with a
400 naming the field (``ModelBackend.check_request``); none is silently dropped.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)

from airlock.registry.schemas import MAX_OUTPUT_TOKENS_CEILING


class WireModel(BaseModel):
    """Base of every OpenAI wire model: unknown fields are ignored, not echoed back."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)


def new_id(prefix: str) -> str:
    """Return a random, prefixed identifier such as ``chatcmpl-3f2a...``."""
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def now_ts() -> int:
    """Return the current Unix time in whole seconds (OpenAI's ``created``)."""
    return int(time.time())


# ---------------------------------------------------------------- tools

_W = TypeVar("_W", bound=BaseModel)


class FunctionSpec(WireModel):
    """A function a client offers the model (``tools[].function``)."""

    # OpenAI's rule for function names; it also keeps names safe to embed in prompts.
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolSpec(WireModel):
    """One entry of a request's ``tools`` list; only function tools exist in chat completions."""

    type: Literal["function"]
    function: FunctionSpec


class FunctionCall(WireModel):
    """The function name and JSON-encoded arguments of a tool call."""

    name: str = Field(min_length=1)
    arguments: str


class ToolCall(WireModel):
    """A tool call made by the assistant (``message.tool_calls[]``)."""

    id: str = Field(min_length=1)
    type: Literal["function"] = "function"
    function: FunctionCall


class _NamedFunction(WireModel):
    name: str = Field(min_length=1)


class NamedToolChoice(WireModel):
    """``tool_choice`` forcing one function: ``{"type": "function", "function": {"name": ...}}``."""

    type: Literal["function"]
    function: _NamedFunction


ToolChoiceMode = Literal["none", "auto", "required", "function"]


def _validate_as(model: type[_W], value: Any, what: str) -> _W:
    """Validate ``value`` as ``model``; raise ``ValueError`` naming the first problem (becomes a 400)."""
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ValueError(f"{what}{'.' + where if where else ''}: {err['msg']}") from None


# ---------------------------------------------------------------- requests


class ContentPart(WireModel):
    """One part of a multi-part message content; only text parts are supported."""

    # A plain string (checked by ChatMessage, with a clearer message than a literal's) documented as an enum.
    type: str = Field(json_schema_extra={"enum": ["text", "input_text"]})
    text: str | None = None


# The rules ChatMessage's validators enforce across fields, stated in its JSON schema so the
# OpenAPI document describes exactly the messages the server accepts.
_MESSAGE_RULES: dict[str, Any] = {
    "allOf": [
        {
            "if": {"properties": {"role": {"const": "tool"}}, "required": ["role"]},
            "then": {"properties": {"tool_call_id": {"type": "string", "minLength": 1}}, "required": ["tool_call_id"]},
        },
        {
            "if": {"properties": {"role": {"not": {"const": "assistant"}}}, "required": ["role"]},
            "then": {"properties": {"tool_calls": {"anyOf": [{"type": "null"}, {"type": "array", "maxItems": 0}]}}},
        },
    ]
}


class ChatMessage(WireModel):
    """A chat message as sent by the client."""

    model_config = ConfigDict(json_schema_extra=_MESSAGE_RULES)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = Field(default=None, description="Required (non-empty) on `tool` messages.")
    tool_calls: list[dict[str, Any]] | None = Field(default=None, description="Only on `assistant` messages.")

    @field_validator("tool_calls", mode="wrap", json_schema_input_type=list[ToolCall] | None)
    @classmethod
    def _check_tool_calls(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> list[dict[str, Any]] | None:
        # The raw dicts are kept (mitigations screen them, the upstream backend forwards them
        # verbatim); they are only checked against the OpenAI shapes here.
        calls: list[dict[str, Any]] | None = handler(value)
        for i, call in enumerate(calls or []):
            _validate_as(ToolCall, call, f"tool_calls[{i}]")
        return calls

    def text(self) -> str:
        """Return the message's text, joining text parts."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text or "" for p in self.content if p.type in ("text", "input_text"))

    @model_validator(mode="after")
    def _only_text_parts(self) -> ChatMessage:
        if isinstance(self.content, list):
            for part in self.content:
                if part.type not in ("text", "input_text"):
                    raise ValueError(f"content part type {part.type!r} is not supported; send text")
        return self

    @model_validator(mode="after")
    def _check_tool_fields(self) -> ChatMessage:
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a message with role 'tool' needs the tool_call_id of the call it answers")
        if self.tool_calls and self.role != "assistant":
            raise ValueError(f"only assistant messages carry tool_calls, not {self.role!r} messages")
        return self

    def parsed_tool_calls(self) -> list[ToolCall]:
        """Return the message's tool calls as wire models (validated on construction)."""
        return [ToolCall.model_validate(call) for call in self.tool_calls or []]


class StreamOptions(WireModel):
    """Options for streamed responses."""

    include_usage: bool = False


class SamplingFields(WireModel):
    """Sampling fields common to chat and text completions (unmodelled fields are kept, see ``extra_fields``)."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    model: str = Field(min_length=1, description="Model id, `{model}/{variant}` or `{model}@{version}/{variant}`.")
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, description="Sampling temperature; 0 is greedy.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    n: int = Field(default=1, ge=1, le=16, description="Number of choices to generate.")
    stop: str | list[str] | None = Field(default=None, description="Up to 4 stop sequences.")
    seed: int | None = Field(default=None, description="Seed for reproducible sampling.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0, description="Penalty on tokens already generated.")
    frequency_penalty: float = Field(
        default=0.0, ge=-2.0, le=2.0, description="Penalty per time a token was already generated."
    )
    logit_bias: dict[str, float] | None = Field(
        default=None, description="Token id (as a string) -> bias from -100 to 100 added to its logit."
    )
    user: str | None = None
    _watermark_key: bytes | None = PrivateAttr(default=None)

    @property
    def watermark_key(self) -> bytes | None:
        """Return the key of the watermark sampled tokens carry (set by the gateway from the grant, never sent)."""
        return self._watermark_key

    def set_watermark_key(self, key: bytes | None) -> None:
        """Have the tokens this request samples (temperature > 0) carry the watermark of ``key``."""
        self._watermark_key = key

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (value or {}).items():
            if not key.isdigit():
                raise ValueError(f"keys are token ids, not {key!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"bias of token {key} is {bias}; biases lie between -100 and 100")
        return value

    def extra_fields(self) -> dict[str, Any]:
        """Return the fields the client sent that these wire models do not model, as sent."""
        return dict(self.model_extra or {})

    def token_bias(self) -> dict[int, float]:
        """Return ``logit_bias`` keyed by token id."""
        return {int(k): v for k, v in (self.logit_bias or {}).items()}

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list):
            if len(value) > 4:
                raise ValueError("at most 4 stop sequences are allowed")
            if any(not s for s in value):
                raise ValueError("stop sequences must be non-empty")
        elif value == "":
            raise ValueError("stop sequences must be non-empty")
        return value

    def stop_list(self) -> list[str]:
        """Return the stop sequences as a list."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


_BUDGET_HELP = (
    "Maximum generated tokens per choice: at most the variant's `max_output_tokens` "
    "(`GET /v1/airlock/models/{model}` shows it); a larger value is refused with 400 `invalid_value`."
)
# The serving path checks the variant's cap (never above this ceiling); the schema shows the ceiling.
_BUDGET_SCHEMA: dict[str, Any] = {"maximum": MAX_OUTPUT_TOKENS_CEILING}


class JsonSchemaFormat(WireModel):
    """``response_format.json_schema``: the schema the answer must follow."""

    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(WireModel):
    """``response_format``: free ``text``, any ``json_object``, or a ``json_schema``."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_type(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs json_schema")
        return self

    def constraint(self) -> dict[str, Any] | None:
        """Return the JSON schema the answer must follow (``None`` for free text)."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return {"type": "object"}
        assert self.json_schema is not None
        return self.json_schema.schema_ or {}


class ChatCompletionRequest(SamplingFields):
    """`POST /v1/chat/completions` body."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, description=_BUDGET_HELP, json_schema_extra=_BUDGET_SCHEMA)
    max_completion_tokens: int | None = Field(
        default=None, ge=1, description=_BUDGET_HELP, json_schema_extra=_BUDGET_SCHEMA
    )
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = Field(default=None, description="Function tools the model may call.")
    tool_choice: Any = Field(
        default=None,
        description="'none', 'auto', 'required' (needs tools) or a named function (one of the offered tools).",
    )
    parallel_tool_calls: bool | None = Field(default=None, description="false: at most one tool call.")
    response_format: ResponseFormat | None = Field(
        default=None, description="`text`, `json_object` or `json_schema` (constrained decoding)."
    )

    @field_validator("tools", mode="wrap", json_schema_input_type=list[ToolSpec] | None)
    @classmethod
    def _check_tools(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> list[dict[str, Any]] | None:
        # Kept as raw dicts (the upstream backend forwards them verbatim), checked as ToolSpec.
        tools: list[dict[str, Any]] | None = handler(value)
        seen: set[str] = set()
        for i, tool in enumerate(tools or []):
            name = _validate_as(ToolSpec, tool, f"tools[{i}]").function.name
            if name in seen:
                raise ValueError(f"tools[{i}]: function {name!r} is offered twice")
            seen.add(name)
        return tools

    @field_validator(
        "tool_choice", mode="wrap", json_schema_input_type=Literal["none", "auto", "required"] | NamedToolChoice | None
    )
    @classmethod
    def _check_tool_choice(cls, value: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo) -> Any:
        value = handler(value)
        if value is None:
            return None
        if isinstance(value, str):
            if value not in ("none", "auto", "required"):
                raise ValueError(f"must be 'none', 'auto', 'required' or a named function, not {value!r}")
        else:
            value = _validate_as(NamedToolChoice, value, "tool_choice").model_dump()
        if "tools" not in info.data:
            return value  # the tools themselves are invalid, and that error is reported instead
        tools: list[dict[str, Any]] = info.data["tools"] or []
        if value == "required" and not tools:
            raise ValueError("'required' needs tools")
        if isinstance(value, dict):
            name = value["function"]["name"]
            if name not in {t["function"]["name"] for t in tools}:
                raise ValueError(f"names function {name!r}, which is not among the offered tools")
        return value

    def tool_specs(self) -> list[ToolSpec]:
        """Return the offered tools as wire models (validated on construction)."""
        return [ToolSpec.model_validate(tool) for tool in self.tools or []]

    def tool_mode(self) -> ToolChoiceMode:
        """Return how the model must use the tools (``auto`` when tools are offered without a choice)."""
        choice = self.tool_choice
        if not self.tools or choice == "none":
            return "none"
        if choice is None or choice == "auto":
            return "auto"
        if choice == "required":
            return "required"
        return "function"

    def forced_function(self) -> str | None:
        """Return the function name ``tool_choice`` forces, if any."""
        if self.tool_mode() != "function":
            return None
        return NamedToolChoice.model_validate(self.tool_choice).function.name

    @model_validator(mode="after")
    def _check_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and self.top_logprobs > 0 and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs=true")
        return self

    def max_new_tokens(self, default: int) -> int:
        """Return the generation budget, preferring `max_completion_tokens`."""
        return self.max_completion_tokens or self.max_tokens or default

    def wants_logprobs(self) -> bool:
        """Return whether the client asked for any log-probabilities (vLLM's ``prompt_logprobs`` included)."""
        return self.logprobs or self.extra_fields().get("prompt_logprobs") is not None


TokenId = Annotated[int, Field(ge=0)]
_PromptSchema = (
    str
    | Annotated[list[str], Field(min_length=1)]
    | Annotated[list[TokenId], Field(min_length=1)]
    | Annotated[list[list[TokenId]], Field(min_length=1)]
)


class CompletionRequest(SamplingFields):
    """`POST /v1/completions` body."""

    prompt: str | list[str] | list[TokenId] | list[list[TokenId]] = Field(
        description="Text, texts, token ids, or lists of token ids (an empty string or id list is allowed)."
    )
    max_tokens: int = Field(default=16, ge=0, description=_BUDGET_HELP, json_schema_extra=_BUDGET_SCHEMA)
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False

    @field_validator("prompt", mode="wrap", json_schema_input_type=_PromptSchema)
    @classmethod
    def _check_prompt(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        # An empty list is refused with this message rather than one error per union member.
        if isinstance(value, list) and len(value) == 0:
            raise ValueError("prompt must not be empty")
        return handler(value)

    def wants_logprobs(self) -> bool:
        """Return whether the client asked for any log-probabilities (vLLM's ``prompt_logprobs`` included)."""
        return self.logprobs is not None or self.extra_fields().get("prompt_logprobs") is not None

    def prompts(self) -> list[str | list[int]]:
        """Return the prompt(s) as a list of strings or token-id lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


# ---------------------------------------------------------------- responses


class Usage(WireModel):
    """Token accounting for one response."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class TopLogprob(WireModel):
    """One alternative token and its log-probability (chat format)."""

    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(WireModel):
    """A sampled token, its log-probability and the top alternatives (chat format)."""

    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(WireModel):
    """Chat-format log-probabilities of a choice."""

    content: list[TokenLogprob] | None = None


FinishReason = Literal["stop", "length", "content_filter", "tool_calls"]


class AssistantMessage(WireModel):
    """The assistant message of a chat choice."""

    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatChoice(WireModel):
    """One choice of a chat completion."""

    index: int
    message: AssistantMessage
    finish_reason: FinishReason | None = "stop"
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(WireModel):
    """`chat.completion` response."""

    id: str = Field(default_factory=lambda: new_id("chatcmpl-"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now_ts)
    model: str
    choices: list[ChatChoice]
    usage: Usage = Field(default_factory=Usage)
    system_fingerprint: str | None = None


class ChatDelta(WireModel):
    """Incremental message content in a stream chunk."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None

    @field_validator("tool_calls")
    @classmethod
    def _index_tool_calls(cls, value: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        # Streamed tool calls are merged by ``index`` (OpenAI's SDK requires it); a complete
        # message's calls replayed as one delta (buffered streams) get their list position.
        if value is None:
            return None
        return [call if "index" in call else {"index": i, **call} for i, call in enumerate(value)]


class ChatChunkChoice(WireModel):
    """One choice of a streamed chat chunk."""

    index: int
    delta: ChatDelta
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(WireModel):
    """`chat.completion.chunk` stream event."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=now_ts)
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(WireModel):
    """Legacy completions-format log-probabilities (one entry per token)."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class PromptLogprob(WireModel):
    """One entry of vLLM's ``prompt_logprobs``: a token's log-probability, rank and text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


class CompletionChoice(WireModel):
    """One choice of a text completion."""

    index: int
    text: str
    finish_reason: FinishReason | None = "stop"
    logprobs: CompletionLogprobs | None = None
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = Field(
        default=None, description="vLLM's prompt log-probabilities by token id (vLLM upstreams, on request)."
    )


class Completion(WireModel):
    """`text_completion` response (also used for stream chunks)."""

    id: str = Field(default_factory=lambda: new_id("cmpl-"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now_ts)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = Field(default_factory=Usage)
    system_fingerprint: str | None = None


class ModelCard(WireModel):
    """An entry of `GET /v1/models`."""

    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "airlock"


class ModelList(WireModel):
    """`GET /v1/models` response."""

    object: Literal["list"] = "list"
    data: list[ModelCard]
