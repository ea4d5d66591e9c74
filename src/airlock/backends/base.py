"""The model-backend interface: one base class with safe defaults, registered by name."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, ClassVar

from airlock.backends.protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
)
from airlock.errors import ConfigError, InvalidRequestError


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

    async def start(self) -> None:
        """Load weights / open connections; called once before the first request."""

    async def aclose(self) -> None:
        """Release resources; called once at shutdown."""

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


async def _chat_as_stream(backend: ModelBackend, request: ChatCompletionRequest) -> AsyncIterator[ChatCompletionChunk]:
    from airlock.backends.protocol import ChatChunkChoice, ChatDelta

    result = await backend.chat(request)
    for choice in result.choices:
        yield ChatCompletionChunk(
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
    yield ChatCompletionChunk(id=result.id, model=result.model, created=result.created, choices=[], usage=result.usage)


async def _complete_as_stream(backend: ModelBackend, request: CompletionRequest) -> AsyncIterator[Completion]:
    result = await backend.complete(request)
    yield result.model_copy(update={"usage": None})
    yield Completion(id=result.id, model=result.model, created=result.created, choices=[], usage=result.usage)


BackendFactory = Callable[[dict[str, Any]], ModelBackend]
_FACTORIES: dict[str, BackendFactory] = {}


def register_backend(kind: str, factory: BackendFactory) -> None:
    """Register ``factory`` as the constructor for backends of type ``kind``."""
    _FACTORIES[kind] = factory


def create_backend(kind: str, config: dict[str, Any]) -> ModelBackend:
    """Instantiate a backend of type ``kind`` from its manifest ``config``."""
    _load_builtin_backends()
    try:
        factory = _FACTORIES[kind]
    except KeyError:
        known = ", ".join(sorted(_FACTORIES)) or "none"
        raise ConfigError(f"unknown backend type {kind!r} (known: {known})") from None
    return factory(config)


def _load_builtin_backends() -> None:
    # Imported lazily: the local backend pulls in torch only when it is used.
    if "local" not in _FACTORIES:

        def _local(config: dict[str, Any]) -> ModelBackend:
            from airlock.backends.local import LocalBackend

            return LocalBackend.from_config(config)

        register_backend("local", _local)
    if "openai_upstream" not in _FACTORIES:

        def _upstream(config: dict[str, Any]) -> ModelBackend:
            from airlock.backends.openai_upstream import OpenAIUpstreamBackend

            return OpenAIUpstreamBackend.from_config(config)

        register_backend("openai_upstream", _upstream)
