"""Variant mitigations and the pipeline that applies them around a model backend.

A variant (``production``, ``helpful-only``, ...) declares an ordered list of mitigations,
each ``{name, kind, config, stance}``. Three kinds act at request time:

* ``system_prompt`` adds the lab's system prompt to chat requests (``prepend`` or ``replace``);
* ``input_filter`` screens what the client sent and refuses without calling the model;
* ``output_filter`` screens each generated choice and replaces blocked ones with a refusal.

Every other kind (``harmlessness_training``, ``rate_limit``, ``monitoring``, or one Airlock
does not know) is *declarative*: recorded for governance, no runtime effect here. The
``stance`` of a mitigation is governance metadata and is not read by this module.

Each check yields a :class:`Verdict`; the pipeline appends verdicts to the list in
:data:`VERDICTS` when the caller (the gateway) has set one, so every decision is audited.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from functools import cache
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from airlock.backends.base import ModelBackend
from airlock.backends.classifiers import Classifier, PatternClassifier, build_classifier, run_inference
from airlock.backends.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatMessage,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Usage,
)
from airlock.errors import ConfigError, InvalidRequestError

logger = logging.getLogger(__name__)

Stage = Literal["input", "output"]
_M = TypeVar("_M", bound=BaseModel)

#: Refusal returned in place of blocked content when a filter names no message of its own.
DEFAULT_REFUSAL = "I'm sorry, but I can't help with that request."


@dataclass(frozen=True)
class Verdict:
    """The outcome of one mitigation check, recorded in the audit trail."""

    mitigation: str
    kind: str
    stage: Stage
    blocked: bool
    reason: str
    score: float | None = None


#: Per-request verdict sink: the gateway sets a fresh list before calling the pipeline.
VERDICTS: ContextVar[list[Verdict] | None] = ContextVar("airlock_mitigation_verdicts", default=None)


def _record(verdict: Verdict) -> None:
    sink = VERDICTS.get()
    if sink is not None:
        sink.append(verdict)
    if verdict.blocked:
        logger.info("mitigation %r blocked %s: %s", verdict.mitigation, verdict.stage, verdict.reason)


# ---------------------------------------------------------------- base and registry


class Mitigation:
    """One mitigation of a variant; every hook defaults to doing nothing."""

    #: Registry name used in the manifest (``kind: input_filter``).
    kind: ClassVar[str] = ""
    #: Whether the mitigation acts on requests (``False``: recorded for governance only).
    runtime: ClassVar[bool] = False
    #: Whether :meth:`check_input` / :meth:`check_output` do anything (lets the pipeline skip work).
    inspects_input: ClassVar[bool] = False
    inspects_output: ClassVar[bool] = False

    def __init__(self, name: str, config: Mapping[str, Any] | None = None) -> None:
        self.name = name
        #: The normalized configuration, as recorded for governance.
        self.config: dict[str, Any] = dict(config or {})
        #: Text returned to the client in place of content this mitigation blocks.
        self.refusal_message: str = DEFAULT_REFUSAL

    @classmethod
    def from_config(cls, name: str, config: Mapping[str, Any]) -> Mitigation:
        """Build the mitigation from its manifest ``config``; raise ``ConfigError`` when it is invalid."""
        if config:
            raise ConfigError(f"mitigation {name!r} ({cls.kind}) takes no config, got: {', '.join(sorted(config))}")
        return cls(name)

    async def start(self) -> None:
        """Load models or other resources before the first request (default: nothing)."""

    def transform_chat(self, request: ChatCompletionRequest) -> ChatCompletionRequest:
        """Return the chat request to send on (default: unchanged)."""
        return request

    async def check_input(self, texts: list[str]) -> Verdict | None:
        """Screen the client's input texts; ``None`` means this mitigation does not screen input."""
        return None

    async def check_output(self, text: str) -> Verdict | None:
        """Screen one generated text; ``None`` means this mitigation does not screen output."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, kind={self.kind!r})"


_MITIGATIONS: dict[str, type[Mitigation]] = {}


def register_mitigation(kind: str, cls: type[Mitigation]) -> None:
    """Register ``cls`` as the implementation of mitigations of type ``kind``."""
    if not kind:
        raise ValueError("mitigation kind must be non-empty")
    _MITIGATIONS[kind] = cls


def mitigation_kinds() -> list[str]:
    """Return the registered mitigation kinds, sorted."""
    return sorted(_MITIGATIONS)


def build_mitigation(name: str, kind: str, config: Mapping[str, Any] | None = None) -> Mitigation:
    """Instantiate a mitigation; unknown kinds become declarative, runtime kinds are validated strictly."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"mitigation name must be a non-empty string, got {name!r}")
    if not isinstance(kind, str) or not kind.strip():
        raise ConfigError(f"mitigation {name!r}: kind must be a non-empty string, got {kind!r}")
    if config is None:
        config = {}
    if not isinstance(config, Mapping):
        raise ConfigError(f"mitigation {name!r} ({kind}): config must be a mapping, got {type(config).__name__}")
    cls = _MITIGATIONS.get(kind)
    if cls is None:
        # An unknown kind is still a claim a lab makes about its deployment; it is recorded for
        # governance but cannot be enforced here.
        logger.info("mitigation %r has kind %r, unknown to Airlock: recorded as declarative", name, kind)
        cls = _declarative_class(kind)
    return cls.from_config(name, config)


def _validate(model: type[_M], name: str, kind: str, config: Mapping[str, Any]) -> _M:
    try:
        return model.model_validate(dict(config))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"mitigation {name!r} ({kind}): invalid config: {problems}") from None


class _StrictConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------- declarative kinds


class DeclarativeMitigation(Mitigation):
    """A mitigation with no runtime effect (training, rate limits, monitoring): recorded for governance."""

    runtime = False

    @classmethod
    def from_config(cls, name: str, config: Mapping[str, Any]) -> Mitigation:
        """Accept any configuration; it is recorded verbatim."""
        return cls(name, config)


class HarmlessnessTraining(DeclarativeMitigation):
    """The model was trained to refuse harmful requests (a property of the weights)."""

    kind = "harmlessness_training"


class RateLimitMitigation(DeclarativeMitigation):
    """Deployment rate limits; enforced by the gateway's quotas, not by the pipeline."""

    kind = "rate_limit"


class MonitoringMitigation(DeclarativeMitigation):
    """Post-hoc monitoring of traffic; recorded for governance."""

    kind = "monitoring"


@cache
def _declarative_class(kind: str) -> type[Mitigation]:
    # One subclass per unknown kind so instances report the kind the manifest declared.
    return type(f"Declarative[{kind}]", (DeclarativeMitigation,), {"kind": kind, "__doc__": f"Declared {kind}."})


# ---------------------------------------------------------------- system prompt


class SystemPromptConfig(_StrictConfig):
    """Configuration of a ``system_prompt`` mitigation."""

    prompt: str = Field(min_length=1)
    mode: Literal["prepend", "replace"] = "prepend"

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must not be blank")
        return value


class SystemPrompt(Mitigation):
    """Adds the lab's system prompt to chat requests.

    ``prepend`` merges the prompt in front of a leading client system/developer message, or
    inserts a system message first when there is none. ``replace`` drops every client
    system/developer message and puts the lab's prompt first.
    """

    kind = "system_prompt"
    runtime = True

    def __init__(self, name: str, settings: SystemPromptConfig) -> None:
        super().__init__(name, settings.model_dump())
        self.settings = settings

    @classmethod
    def from_config(cls, name: str, config: Mapping[str, Any]) -> Mitigation:
        """Validate ``prompt`` and ``mode``."""
        return cls(name, _validate(SystemPromptConfig, name, cls.kind, config))

    def transform_chat(self, request: ChatCompletionRequest) -> ChatCompletionRequest:
        """Return ``request`` with the system prompt applied."""
        prompt = self.settings.prompt
        messages = list(request.messages)
        if self.settings.mode == "replace":
            kept = [m for m in messages if m.role not in ("system", "developer")]
            messages = [ChatMessage(role="system", content=prompt), *kept]
        elif messages and messages[0].role in ("system", "developer"):
            first = messages[0]
            client_text = first.text()
            merged = f"{prompt}\n\n{client_text}" if client_text else prompt
            messages = [first.model_copy(update={"content": merged}), *messages[1:]]
        else:
            messages = [ChatMessage(role="system", content=prompt), *messages]
        return request.model_copy(update={"messages": messages})


# ---------------------------------------------------------------- filters


class FilterConfig(_StrictConfig):
    """Configuration of an ``input_filter`` or ``output_filter`` mitigation."""

    patterns: list[str] = Field(default_factory=list, description="Case-insensitive regular expressions.")
    classifier: str | None = Field(default=None, description="'embedding', 'none' or a registered classifier.")
    exemplars: list[str] = Field(default_factory=list, description="Descriptions of disallowed content.")
    threshold: float = Field(default=0.6, gt=0.0, le=1.0, description="Block at or above this classifier score.")
    refusal_message: str = Field(default=DEFAULT_REFUSAL, min_length=1)
    classifier_options: dict[str, Any] = Field(default_factory=dict, description="Passed to a custom classifier.")

    @field_validator("patterns")
    @classmethod
    def _compile_patterns(cls, value: list[str]) -> list[str]:
        for pattern in value:
            if not pattern:
                raise ValueError("patterns must be non-empty (an empty pattern matches everything)")
            try:
                re.compile(pattern, re.IGNORECASE)
            except re.error as exc:
                raise ValueError(f"invalid regular expression {pattern!r}: {exc}") from None
        return value

    @field_validator("exemplars")
    @classmethod
    def _exemplars_not_blank(cls, value: list[str]) -> list[str]:
        if any(not e.strip() for e in value):
            raise ValueError("exemplars must be non-empty strings")
        return value

    def classifier_name(self) -> str:
        """Return the effective classifier: the configured one, else ``embedding`` with exemplars, else ``none``."""
        if self.classifier is not None:
            return self.classifier
        return "embedding" if self.exemplars else "none"


class _ContentFilter(Mitigation):
    """Shared logic of the input and output filters: patterns first, then the classifier."""

    runtime = True
    stage: ClassVar[Stage]

    def __init__(self, name: str, settings: FilterConfig, classifier: Classifier | None) -> None:
        super().__init__(name, settings.model_dump())
        self.settings = settings
        self.refusal_message = settings.refusal_message
        self.patterns = PatternClassifier(settings.patterns) if settings.patterns else None
        self.classifier = classifier

    @classmethod
    def from_config(cls, name: str, config: Mapping[str, Any]) -> Mitigation:
        """Validate the filter and build its classifier (the model itself loads lazily)."""
        settings = _validate(FilterConfig, name, cls.kind, config)
        classifier_name = settings.classifier_name()
        prefix = f"mitigation {name!r} ({cls.kind})"
        classifier: Classifier | None = None
        if classifier_name == "none":
            if settings.exemplars:
                raise ConfigError(f"{prefix}: exemplars are given but classifier is 'none'")
            if settings.classifier_options:
                raise ConfigError(f"{prefix}: classifier_options are given but classifier is 'none'")
            if not settings.patterns:
                raise ConfigError(f"{prefix}: nothing to check; give patterns, exemplars or a classifier")
        else:
            try:
                classifier = build_classifier(classifier_name, settings.exemplars, settings.classifier_options)
            except ConfigError as exc:
                raise ConfigError(f"{prefix}: {exc.message}") from None
        return cls(name, settings, classifier)

    async def start(self) -> None:
        """Load the classifier's model so the first request does not pay for it."""
        if self.classifier is not None:
            await run_inference(self.classifier.load)

    def _verdict(self, blocked: bool, reason: str, score: float | None) -> Verdict:
        return Verdict(
            mitigation=self.name, kind=self.kind, stage=self.stage, blocked=blocked, reason=reason, score=score
        )

    async def _check(self, texts: list[str]) -> Verdict:
        texts = [t for t in texts if t]
        if self.patterns is not None:
            for value, reason in self.patterns.score(texts):
                if value >= 1.0:
                    return self._verdict(True, reason, value)
        if self.classifier is None or not texts:
            return self._verdict(False, "no pattern matched" if texts else "no text", None)
        scores = await self.classifier.ascore(texts)
        value, reason = max(scores, key=lambda s: s[0] if math.isfinite(s[0]) else math.inf)
        # "not below" rather than ">=": a NaN score from a broken classifier blocks (fail closed).
        blocked = not value < self.settings.threshold
        return self._verdict(blocked, reason, value)


class InputFilter(_ContentFilter):
    """Refuses requests whose client-supplied text matches a pattern or scores above the threshold."""

    kind = "input_filter"
    stage = "input"
    inspects_input = True

    async def check_input(self, texts: list[str]) -> Verdict | None:
        """Screen the client's texts."""
        return await self._check(texts)


class OutputFilter(_ContentFilter):
    """Replaces generated choices that match a pattern or score above the threshold with a refusal."""

    kind = "output_filter"
    stage = "output"
    inspects_output = True

    async def check_output(self, text: str) -> Verdict | None:
        """Screen one generated text."""
        return await self._check([text])


for _cls in (SystemPrompt, InputFilter, OutputFilter, HarmlessnessTraining, RateLimitMitigation, MonitoringMitigation):
    register_mitigation(_cls.kind, _cls)


# ---------------------------------------------------------------- pipeline


def _tool_call_texts(calls: list[dict[str, Any]] | None) -> list[str]:
    """Return the client- or model-authored text inside tool calls (function names and arguments)."""
    texts: list[str] = []
    for call in calls or []:
        function = call.get("function")
        if isinstance(function, dict):
            arguments = function.get("arguments")
            if not isinstance(arguments, str):
                arguments = json.dumps(arguments, default=str)
            texts.append(f"{function.get('name', '')} {arguments}")
        else:
            texts.append(json.dumps(call, default=str))
    return texts


def chat_input_texts(request: ChatCompletionRequest) -> list[str]:
    """Return every text the client authored in a chat request, one entry per message or tool call.

    All roles are screened, not only the last user message: earlier turns, tool results, client
    system messages and fabricated assistant turns (prefill) are all client-controlled and reach
    the model. Screen the request *before* the lab's system prompt is added, so a system prompt
    that names forbidden topics does not trip the lab's own filter.
    """
    texts: list[str] = []
    for message in request.messages:
        text = message.text()
        if text:
            texts.append(text)
        texts.extend(_tool_call_texts(message.tool_calls))
    # Tool names, descriptions and schemas are client-written text rendered into the prompt too.
    for tool in request.tools or []:
        texts.append(json.dumps(tool, sort_keys=True, default=str))
    return texts


def _choice_text(message: AssistantMessage) -> str:
    parts = [message.content or "", *_tool_call_texts(message.tool_calls)]
    return "\n".join(p for p in parts if p)


class VariantPipeline(ModelBackend):
    """Applies a variant's mitigations, in order, around an inner backend."""

    kind = "variant_pipeline"

    def __init__(self, inner: ModelBackend, mitigations: Sequence[Mitigation]) -> None:
        self.inner = inner
        self.mitigations = list(mitigations)
        # ModelBackend declares capabilities as class variables; a wrapper has the capabilities
        # of whatever it wraps, so it needs instance values (base.py would need a change to say so).
        self.supports_logprobs = inner.supports_logprobs  # type: ignore[misc]
        self.supports_echo = inner.supports_echo  # type: ignore[misc]
        self._input_filters = [m for m in self.mitigations if m.inspects_input]
        self._output_filters = [m for m in self.mitigations if m.inspects_output]

    @property
    def filters_output(self) -> bool:
        """Whether any output filter runs (streams are then buffered before anything is sent)."""
        return bool(self._output_filters)

    async def start(self) -> None:
        """Start the inner backend, then load mitigation models."""
        await self.inner.start()
        for mitigation in self.mitigations:
            await mitigation.start()

    async def aclose(self) -> None:
        """Close the inner backend."""
        await self.inner.aclose()

    def count_tokens(self, text: str) -> int:
        """Count tokens with the inner backend's tokenizer."""
        return self.inner.count_tokens(text)

    # ------------------------------------------------------------ screening

    def _transform_chat(self, request: ChatCompletionRequest) -> ChatCompletionRequest:
        for mitigation in self.mitigations:
            request = mitigation.transform_chat(request)
        return request

    async def _screen_input(self, texts: list[str]) -> str | None:
        """Run the input filters in order; return the refusal message of the first that blocks."""
        for mitigation in self._input_filters:
            verdict = await mitigation.check_input(texts)
            if verdict is None:
                continue
            _record(verdict)
            if verdict.blocked:
                return mitigation.refusal_message
        return None

    async def _screen_output(self, text: str) -> str | None:
        """Run the output filters in order on one choice; return the refusal of the first that blocks."""
        for mitigation in self._output_filters:
            verdict = await mitigation.check_output(text)
            if verdict is None:
                continue
            _record(verdict)
            if verdict.blocked:
                return mitigation.refusal_message
        return None

    def _completion_input_texts(self, request: CompletionRequest) -> list[str]:
        texts: list[str] = []
        for prompt in request.prompts():
            if not isinstance(prompt, str):
                # Token ids cannot be screened without decoding them; refuse rather than let them
                # slip past the filter.
                raise InvalidRequestError(
                    "this model variant screens prompts; send the prompt as text, not token ids", param="prompt"
                )
            texts.append(prompt)
        return texts

    def _usage_for(self, texts: Sequence[str]) -> Usage:
        prompt_tokens = sum(self.inner.count_tokens(t) for t in texts if t)
        return Usage(prompt_tokens=prompt_tokens, completion_tokens=0, total_tokens=prompt_tokens)

    def _refused_chat(self, request: ChatCompletionRequest, refusal: str) -> ChatCompletion:
        return ChatCompletion(
            model=request.model,
            choices=[
                ChatChoice(index=i, message=AssistantMessage(content=refusal), finish_reason="content_filter")
                for i in range(request.n)
            ],
            usage=self._usage_for([m.text() for m in request.messages]),
        )

    def _refused_completion(self, request: CompletionRequest, prompts: list[str], refusal: str) -> Completion:
        # OpenAI orders choices prompt-major: choice i*n + j is the j-th sample of prompt i.
        return Completion(
            model=request.model,
            choices=[
                CompletionChoice(index=i, text=refusal, finish_reason="content_filter")
                for i in range(len(prompts) * request.n)
            ],
            usage=self._usage_for(prompts),
        )

    async def _filter_chat(self, result: ChatCompletion) -> ChatCompletion:
        if not self._output_filters:
            return result
        choices: list[ChatChoice] = []
        changed = False
        for choice in result.choices:
            refusal = await self._screen_output(_choice_text(choice.message))
            if refusal is None:
                choices.append(choice)
                continue
            changed = True
            choices.append(
                choice.model_copy(
                    update={
                        "message": AssistantMessage(content=refusal),
                        "finish_reason": "content_filter",
                        "logprobs": None,
                    }
                )
            )
        return result.model_copy(update={"choices": choices}) if changed else result

    async def _filter_completion(self, result: Completion) -> Completion:
        if not self._output_filters:
            return result
        choices: list[CompletionChoice] = []
        changed = False
        for choice in result.choices:
            refusal = await self._screen_output(choice.text)
            if refusal is None:
                choices.append(choice)
                continue
            changed = True
            choices.append(
                choice.model_copy(update={"text": refusal, "finish_reason": "content_filter", "logprobs": None})
            )
        return result.model_copy(update={"choices": choices}) if changed else result

    # ------------------------------------------------------------ chat

    async def _chat_screened(self, request: ChatCompletionRequest) -> tuple[ChatCompletionRequest, str | None]:
        prepared = self._transform_chat(request)
        if not self._input_filters:
            return prepared, None
        return prepared, await self._screen_input(chat_input_texts(request))

    async def chat(self, request: ChatCompletionRequest) -> ChatCompletion:
        """Return a chat completion with every mitigation applied."""
        prepared, refusal = await self._chat_screened(request)
        if refusal is not None:
            return self._refused_chat(prepared, refusal)
        return await self._filter_chat(await self.inner.chat(prepared))

    async def chat_stream(self, request: ChatCompletionRequest) -> AsyncIterator[ChatCompletionChunk]:
        """Yield chat chunks; buffered when an output filter must see the whole text first."""
        prepared, refusal = await self._chat_screened(request)
        if refusal is not None:
            for chunk in _chat_chunks(self._refused_chat(prepared, refusal)):
                yield chunk
            return
        if not self._output_filters:
            stream = self.inner.chat_stream(prepared)
            try:
                async for chunk in stream:
                    yield chunk
            finally:
                await _aclose(stream)
            return
        # Streaming unfiltered tokens would leak what the filter is about to block, so generate
        # the whole answer first and replay the filtered result as chunks.
        buffered = prepared.model_copy(update={"stream": False, "stream_options": None})
        result = await self._filter_chat(await self.inner.chat(buffered))
        for chunk in _chat_chunks(result):
            yield chunk

    # ------------------------------------------------------------ completions

    async def _complete_screened(self, request: CompletionRequest) -> str | None:
        if not self._input_filters:
            return None
        prompts = self._completion_input_texts(request)
        return await self._screen_input(prompts)

    async def complete(self, request: CompletionRequest) -> Completion:
        """Return a text completion with the filters applied (system prompts do not apply to raw prompts)."""
        refusal = await self._complete_screened(request)
        if refusal is not None:
            return self._refused_completion(request, self._completion_input_texts(request), refusal)
        return await self._filter_completion(await self.inner.complete(request))

    async def complete_stream(self, request: CompletionRequest) -> AsyncIterator[Completion]:
        """Yield completion chunks; buffered when an output filter must see the whole text first."""
        refusal = await self._complete_screened(request)
        if refusal is not None:
            for chunk in _completion_chunks(
                self._refused_completion(request, self._completion_input_texts(request), refusal)
            ):
                yield chunk
            return
        if not self._output_filters:
            stream = self.inner.complete_stream(request)
            try:
                async for chunk in stream:
                    yield chunk
            finally:
                await _aclose(stream)
            return
        buffered = request.model_copy(update={"stream": False, "stream_options": None})
        result = await self._filter_completion(await self.inner.complete(buffered))
        for chunk in _completion_chunks(result):
            yield chunk


async def _aclose(stream: AsyncIterator[Any]) -> None:
    # Close the inner generator now (e.g. the upstream HTTP response) instead of at garbage collection.
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()


def _chat_chunks(result: ChatCompletion) -> list[ChatCompletionChunk]:
    """Return ``result`` as stream chunks: one per choice, then a final chunk carrying usage."""
    chunks = [
        ChatCompletionChunk(
            id=result.id,
            model=result.model,
            created=result.created,
            choices=[
                ChatChunkChoice(
                    index=choice.index,
                    delta=ChatDelta(
                        role="assistant", content=choice.message.content, tool_calls=choice.message.tool_calls
                    ),
                    finish_reason=choice.finish_reason,
                    logprobs=choice.logprobs,
                )
            ],
        )
        for choice in result.choices
    ]
    chunks.append(
        ChatCompletionChunk(id=result.id, model=result.model, created=result.created, choices=[], usage=result.usage)
    )
    return chunks


def _completion_chunks(result: Completion) -> list[Completion]:
    """Return ``result`` as stream chunks: the choices, then a final chunk carrying usage."""
    return [
        result.model_copy(update={"usage": None}),
        Completion(id=result.id, model=result.model, created=result.created, choices=[], usage=result.usage),
    ]


def build_pipeline(inner: ModelBackend, specs: Sequence[Mapping[str, Any]]) -> VariantPipeline:
    """Build a :class:`VariantPipeline` from manifest specs ``{name, kind, config, stance}``."""
    mitigations: list[Mitigation] = []
    seen: set[str] = set()
    for position, spec in enumerate(specs):
        if not isinstance(spec, Mapping):
            raise ConfigError(f"mitigation #{position} must be a mapping, got {type(spec).__name__}")
        name, kind = spec.get("name"), spec.get("kind")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"mitigation #{position} needs a non-empty 'name'")
        if not isinstance(kind, str) or not kind:
            raise ConfigError(f"mitigation {name!r} needs a non-empty 'kind'")
        if name in seen:
            # Verdicts and governance records are keyed by name.
            raise ConfigError(f"mitigation name {name!r} is used twice in one variant")
        seen.add(name)
        mitigations.append(build_mitigation(name, kind, spec.get("config")))
    return VariantPipeline(inner, mitigations)
