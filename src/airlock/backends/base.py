"""The model-backend interface: one base class with safe defaults (backends are found by name in ``registry``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, ClassVar

from airlock.backends.protocol import (
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    Completion,
    CompletionRequest,
    SamplingFields,
)
from airlock.backends.tokenization import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from airlock.errors import InvalidRequestError


class ModelBackend:
    """Serves OpenAI-shaped requests for one underlying model.

    Backends receive requests whose ``model`` field has already been rewritten to the id the
    backend expects, after authorization and input mitigations. Streaming methods yield wire
    chunks; the final chunk of a stream carries ``usage`` so the gateway can account tokens.
    """

    #: Registry name used in ``airlock.yaml`` (``backend: local``).
    kind: ClassVar[str] = ""
    #: Whether the backend can return token log-probabilities.
    supports_logprobs: bool = False
    #: Whether ``/v1/completions`` with ``echo`` returns prompt log-probabilities.
    supports_echo: bool = False
    #: Whether request fields the wire models do not know are forwarded (else refused with a 400).
    forwards_unknown_fields: ClassVar[bool] = False
    #: What the backend does with each modelled request field, for the docs' field table
    #: (``docs/request-fields.md``, checked by a test); a field it cannot honour is refused in ``check_request``.
    field_notes: ClassVar[Mapping[str, str]] = {}

    def check_request(self, request: SamplingFields) -> None:
        """Refuse (400 ``unsupported_parameter``) any field this backend would otherwise ignore."""
        if self.forwards_unknown_fields:
            return
        for name in request.extra_fields():
            raise InvalidRequestError(
                f"{name!r} is not supported by this model; remove it", code="unsupported_parameter", param=name
            )

    async def start(self) -> None:
        """Load weights / open connections; called once before the first request."""

    async def aclose(self) -> None:
        """Release resources; called once at shutdown."""

    async def retire(self) -> None:
        """Release resources for good: nothing serves this backend's weights any more (an expired noised copy).

        Unlike :meth:`aclose` at a process's shutdown, this may also stop what other processes share.
        """
        await self.aclose()

    async def chat(self, request: ChatCompletionRequest) -> ChatCompletion:
        """Return a chat completion for ``request``."""
        raise InvalidRequestError(f"backend {self.kind!r} does not support chat completions")

    def chat_stream(self, request: ChatCompletionRequest) -> AsyncIterator[ChatCompletionChunk]:
        """Yield chat completion chunks for ``request`` (default: one chunk per choice)."""
        return _chat_as_stream(self, request)

    async def complete(self, request: CompletionRequest) -> Completion:
        """Return a text completion for ``request``."""
        raise InvalidRequestError(f"backend {self.kind!r} does not support text completions")

    def complete_stream(self, request: CompletionRequest) -> AsyncIterator[Completion]:
        """Yield text completion chunks for ``request`` (default: the whole completion once)."""
        return _complete_as_stream(self, request)

    def count_tokens(self, text: str) -> int:
        """Return the number of tokens in ``text`` (approximate where unknown)."""
        return max(1, len(text) // 4)

    async def tokenize(self, request: TokenizeRequest) -> TokenizeResponse:
        """Tokenize like vLLM's ``/tokenize`` (default: this backend has no tokenizer to offer)."""
        raise _no_tokenizer(self)

    async def detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        """Detokenize like vLLM's ``/detokenize`` (default: this backend has no tokenizer to offer)."""
        raise _no_tokenizer(self)

    async def tokenizer_info(self) -> dict[str, Any]:
        """Describe the tokenizer like vLLM's ``/tokenizer_info`` (default: none to offer)."""
        raise _no_tokenizer(self)


def _no_tokenizer(backend: ModelBackend) -> InvalidRequestError:
    return InvalidRequestError(
        f"this model's {backend.kind or 'backend'!s} server offers no tokenizer endpoints",
        code="tokenizer_not_available",
    )


def chat_chunks(result: ChatCompletion) -> list[ChatCompletionChunk]:
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


def completion_chunks(result: Completion) -> list[Completion]:
    """Return ``result`` as stream chunks: the choices, then a final chunk carrying usage."""
    return [
        result.model_copy(update={"usage": None}),
        Completion(id=result.id, model=result.model, created=result.created, choices=[], usage=result.usage),
    ]


async def _chat_as_stream(backend: ModelBackend, request: ChatCompletionRequest) -> AsyncIterator[ChatCompletionChunk]:
    for chunk in chat_chunks(await backend.chat(request)):
        yield chunk


async def _complete_as_stream(backend: ModelBackend, request: CompletionRequest) -> AsyncIterator[Completion]:
    for chunk in completion_chunks(await backend.complete(request)):
        yield chunk


def render_field_table(backends: Sequence[type[ModelBackend]]) -> str:
    """Return the Markdown table of every request field and what each backend does with it (for the docs)."""
    chat, text = ChatCompletionRequest.model_fields, CompletionRequest.model_fields
    head = "| field | endpoints | " + " | ".join(f"`{b.kind}`" for b in backends) + " |"
    lines = [head, "|" + "---|" * (len(backends) + 2)]
    for name in sorted(set(chat) | set(text)):
        field = chat.get(name) or text[name]
        endpoints = ", ".join(e for e, fields in (("chat", chat), ("completions", text)) if name in fields)
        notes = [
            b.field_notes.get(name, "forwarded" if b.forwards_unknown_fields else "**undeclared**") for b in backends
        ]
        lines.append(f"| `{field.alias or name}` | {endpoints} | " + " | ".join(notes) + " |")
    other = [
        "forwarded untouched (some refused, below)" if b.forwards_unknown_fields else "400 `unsupported_parameter`"
        for b in backends
    ]
    lines.append("| any other field | both | " + " | ".join(other) + " |")
    return "\n".join(lines) + "\n"
