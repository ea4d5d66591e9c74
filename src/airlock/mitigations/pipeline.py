"""The pipeline that applies a variant's mitigations, in order, around a model backend.

Every call returns what each mitigation decided (:class:`Verdict`) along with the result, so the
caller audits each decision: :meth:`VariantPipeline.screened_chat` and its siblings. The plain
:class:`~airlock.backends.base.ModelBackend` methods serve the same answers without the verdicts.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from airlock.backends.base import ModelBackend, chat_chunks, completion_chunks
from airlock.backends.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    SamplingFields,
    Usage,
)
from airlock.errors import ConfigError, InvalidRequestError
from airlock.mitigations.kinds import Mitigation, Verdict, build_mitigation

logger = logging.getLogger(__name__)
R = TypeVar("R")
C = TypeVar("C")


@dataclass
class Mitigated(Generic[R]):
    """A result and the verdicts of the mitigations that produced it, in the order they ran."""

    result: R
    verdicts: list[Verdict]


@dataclass
class MitigatedStream(Generic[C]):
    """A stream of chunks; ``verdicts`` fills in as the mitigations run (complete once it is exhausted)."""

    chunks: AsyncIterator[C]
    verdicts: list[Verdict] = field(default_factory=list)


def _record(verdicts: list[Verdict], verdict: Verdict) -> None:
    verdicts.append(verdict)
    if verdict.blocked:
        logger.info("mitigation %r blocked %s: %s", verdict.mitigation, verdict.stage, verdict.reason)


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

    def check_request(self, request: SamplingFields) -> None:
        """Refuse what the inner backend would otherwise ignore (see ``ModelBackend.check_request``)."""
        self.inner.check_request(request)

    def count_tokens(self, text: str) -> int:
        """Count tokens with the inner backend's tokenizer."""
        return self.inner.count_tokens(text)

    # ------------------------------------------------------------ screening

    def _transform_chat(self, request: ChatCompletionRequest) -> ChatCompletionRequest:
        for mitigation in self.mitigations:
            request = mitigation.transform_chat(request)
        return request

    async def _screen_input(self, texts: list[str], verdicts: list[Verdict]) -> str | None:
        """Run the input filters in order; return the refusal message of the first that blocks."""
        for mitigation in self._input_filters:
            verdict = await mitigation.check_input(texts)
            if verdict is None:
                continue
            _record(verdicts, verdict)
            if verdict.blocked:
                return mitigation.refusal_message
        return None

    async def _screen_output(self, text: str, verdicts: list[Verdict]) -> str | None:
        """Run the output filters in order on one choice; return the refusal of the first that blocks."""
        for mitigation in self._output_filters:
            verdict = await mitigation.check_output(text)
            if verdict is None:
                continue
            _record(verdicts, verdict)
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

    async def _filter_chat(self, result: ChatCompletion, verdicts: list[Verdict]) -> ChatCompletion:
        if not self._output_filters:
            return result
        choices: list[ChatChoice] = []
        changed = False
        for choice in result.choices:
            refusal = await self._screen_output(_choice_text(choice.message), verdicts)
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

    async def _filter_completion(self, result: Completion, verdicts: list[Verdict]) -> Completion:
        if not self._output_filters:
            return result
        choices: list[CompletionChoice] = []
        changed = False
        for choice in result.choices:
            refusal = await self._screen_output(choice.text, verdicts)
            if refusal is None:
                choices.append(choice)
                continue
            changed = True
            choices.append(
                choice.model_copy(update={"text": refusal, "finish_reason": "content_filter", "logprobs": None})
            )
        return result.model_copy(update={"choices": choices}) if changed else result

    # ------------------------------------------------------------ chat

    async def _chat_screened(
        self, request: ChatCompletionRequest, verdicts: list[Verdict]
    ) -> tuple[ChatCompletionRequest, str | None]:
        prepared = self._transform_chat(request)
        if not self._input_filters:
            return prepared, None
        return prepared, await self._screen_input(chat_input_texts(request), verdicts)

    async def screened_chat(self, request: ChatCompletionRequest) -> Mitigated[ChatCompletion]:
        """Return a chat completion with every mitigation applied, and their verdicts."""
        verdicts: list[Verdict] = []
        prepared, refusal = await self._chat_screened(request, verdicts)
        if refusal is not None:
            return Mitigated(self._refused_chat(prepared, refusal), verdicts)
        return Mitigated(await self._filter_chat(await self.inner.chat(prepared), verdicts), verdicts)

    async def chat(self, request: ChatCompletionRequest) -> ChatCompletion:
        """Return a chat completion with every mitigation applied."""
        return (await self.screened_chat(request)).result

    def screened_chat_stream(self, request: ChatCompletionRequest) -> MitigatedStream[ChatCompletionChunk]:
        """Stream chat chunks (buffered when an output filter must see the whole text first), with verdicts."""
        verdicts: list[Verdict] = []
        return MitigatedStream(self._chat_chunks(request, verdicts), verdicts)

    def chat_stream(self, request: ChatCompletionRequest) -> AsyncIterator[ChatCompletionChunk]:
        """Yield chat chunks with every mitigation applied."""
        return self.screened_chat_stream(request).chunks

    async def _chat_chunks(
        self, request: ChatCompletionRequest, verdicts: list[Verdict]
    ) -> AsyncIterator[ChatCompletionChunk]:
        prepared, refusal = await self._chat_screened(request, verdicts)
        if refusal is not None:
            for chunk in chat_chunks(self._refused_chat(prepared, refusal)):
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
        result = await self._filter_chat(await self.inner.chat(buffered), verdicts)
        for chunk in chat_chunks(result):
            yield chunk

    # ------------------------------------------------------------ completions

    async def _complete_screened(self, request: CompletionRequest, verdicts: list[Verdict]) -> str | None:
        if not self._input_filters:
            return None
        prompts = self._completion_input_texts(request)
        return await self._screen_input(prompts, verdicts)

    async def screened_complete(self, request: CompletionRequest) -> Mitigated[Completion]:
        """Return a text completion with the filters applied, and their verdicts (no system prompt on raw prompts)."""
        verdicts: list[Verdict] = []
        refusal = await self._complete_screened(request, verdicts)
        if refusal is not None:
            refused = self._refused_completion(request, self._completion_input_texts(request), refusal)
            return Mitigated(refused, verdicts)
        return Mitigated(await self._filter_completion(await self.inner.complete(request), verdicts), verdicts)

    async def complete(self, request: CompletionRequest) -> Completion:
        """Return a text completion with the filters applied."""
        return (await self.screened_complete(request)).result

    def screened_complete_stream(self, request: CompletionRequest) -> MitigatedStream[Completion]:
        """Stream completion chunks (buffered when an output filter must see the whole text first), with verdicts."""
        verdicts: list[Verdict] = []
        return MitigatedStream(self._completion_chunks(request, verdicts), verdicts)

    def complete_stream(self, request: CompletionRequest) -> AsyncIterator[Completion]:
        """Yield completion chunks with the filters applied."""
        return self.screened_complete_stream(request).chunks

    async def _completion_chunks(
        self, request: CompletionRequest, verdicts: list[Verdict]
    ) -> AsyncIterator[Completion]:
        refusal = await self._complete_screened(request, verdicts)
        if refusal is not None:
            for chunk in completion_chunks(
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
        result = await self._filter_completion(await self.inner.complete(buffered), verdicts)
        for chunk in completion_chunks(result):
            yield chunk


async def _aclose(stream: AsyncIterator[Any]) -> None:
    # Close the inner generator now (e.g. the upstream HTTP response) instead of at garbage collection.
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()


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
