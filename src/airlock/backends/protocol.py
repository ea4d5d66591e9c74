"""OpenAI wire models shared by the gateway and the backends, all on one base model.

Unknown request fields are ignored (the official SDKs add fields over time); every field
Airlock acts on is validated here, so a bad value is a 400 before any backend runs.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class WireModel(BaseModel):
    """Base of every OpenAI wire model: unknown fields are ignored, not echoed back."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)


def new_id(prefix: str) -> str:
    """Return a random, prefixed identifier such as ``chatcmpl-3f2a...``."""
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def now_ts() -> int:
    """Return the current Unix time in whole seconds (OpenAI's ``created``)."""
    return int(time.time())


# ---------------------------------------------------------------- requests


class ContentPart(WireModel):
    """One part of a multi-part message content; only text parts are supported."""

    type: str
    text: str | None = None


class ChatMessage(WireModel):
    """A chat message as sent by the client."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[dict[str, Any]] | None = None

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


class StreamOptions(WireModel):
    """Options for streamed responses."""

    include_usage: bool = False


class SamplingFields(WireModel):
    """Sampling fields common to chat and text completions."""

    model: str = Field(min_length=1, description="Model id, `{model}/{variant}` or `{model}@{version}/{variant}`.")
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, description="Sampling temperature; 0 is greedy.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    n: int = Field(default=1, ge=1, le=16, description="Number of choices to generate.")
    stop: str | list[str] | None = Field(default=None, description="Up to 4 stop sequences.")
    seed: int | None = Field(default=None, description="Seed for reproducible sampling.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    user: str | None = None

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


class ChatCompletionRequest(SamplingFields):
    """`POST /v1/chat/completions` body."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, description="Maximum generated tokens.")
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None

    @model_validator(mode="after")
    def _check_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and self.top_logprobs > 0 and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs=true")
        return self

    def max_new_tokens(self, default: int) -> int:
        """Return the generation budget, preferring `max_completion_tokens`."""
        return self.max_completion_tokens or self.max_tokens or default

    def wants_logprobs(self) -> bool:
        """Return whether the client asked for any log-probabilities."""
        return self.logprobs


class CompletionRequest(SamplingFields):
    """`POST /v1/completions` body."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = Field(default=16, ge=0)
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value: Any) -> Any:
        if isinstance(value, list) and len(value) == 0:
            raise ValueError("prompt must not be empty")
        return value

    def wants_logprobs(self) -> bool:
        """Return whether the client asked for any log-probabilities."""
        return self.logprobs is not None

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


class CompletionChoice(WireModel):
    """One choice of a text completion."""

    index: int
    text: str
    finish_reason: FinishReason | None = "stop"
    logprobs: CompletionLogprobs | None = None


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
