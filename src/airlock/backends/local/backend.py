"""The OpenAI surface of the local backend: chat and completions, streamed or whole, over the batching engine.

Each request becomes a `Job` of rows (one per choice and prompt) for the `Engine`; its events are
folded into OpenAI responses or chunks as they arrive. ``logit_bias``, ``presence_penalty``,
``frequency_penalty`` and ``response_format`` become per-row logits processors
(:mod:`airlock.backends.local.processors`); ``response_format`` is enforced by constrained decoding
with ``llguidance`` (the JSON schema compiled to a grammar over the model's own tokenizer). Fields
the wire models do not know are refused (400 ``unsupported_parameter``).

Tool calling uses the prompt format of :mod:`airlock.backends.tools` for every model (SmolLM2's
template has no tool support): tools and tool traffic are rendered as text, a forced
``tool_choice`` starts the answer with the call, and the generated text is parsed back into
``tool_calls``. A streamed request that offers tools is generated whole, then sent as chunks, since
a call can only be recognised once its text is complete.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch

from airlock.backends import tokenization, tools, weights
from airlock.backends.base import ModelBackend
from airlock.backends.local.adapters import AdapterViewMixin
from airlock.backends.local.config import BatchStats, LocalBackendConfig
from airlock.backends.local.engine import Engine, Event, Job, PromptInfo, Row, Tok, Update, row_generator
from airlock.backends.local.processors import GrammarConstraint, LogitBias, LogitsProcessor, RepetitionPenalties
from airlock.backends.local.tokens import TokenTable
from airlock.backends.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatMessage,
    ChoiceLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    FinishReason,
    SamplingFields,
    TokenLogprob,
    TopLogprob,
    Usage,
    new_id,
    now_ts,
)
from airlock.backends.watermark import WatermarkStream
from airlock.errors import AirlockError, BackendUnavailableError, InvalidRequestError

log = logging.getLogger(__name__)
T = TypeVar("T")

# JSON cannot carry -inf; a masked-out token is reported at this floor instead.
_LOGPROB_FLOOR = -9999.0


class LocalBackend(ModelBackend):
    """Serves a local transformers model (SmolLM2 by default) with dynamic batching on one worker thread."""

    kind: ClassVar[str] = "local"
    supports_logprobs: bool = True
    supports_echo: bool = True
    _adapter: str | None = None  # the LoRA adapter this backend's requests run with (see adapter_view)

    field_notes: ClassVar[dict[str, str]] = {
        "model": "rewritten by Airlock",
        "messages": "rendered with the model's chat template (tool traffic as text)",
        "prompt": "text, texts or token ids (ids outside the vocabulary: 400)",
        "temperature": "supported (0: greedy)",
        "top_p": "supported",
        "n": "supported (batched rows)",
        "stop": "supported",
        "seed": "supported (same output batched or alone)",
        "stream": "supported",
        "stream_options": "supported (`include_usage`)",
        "presence_penalty": "supported (logits processor, generated tokens only)",
        "frequency_penalty": "supported (logits processor, generated tokens only)",
        "logit_bias": "supported (logits processor; ids outside the vocabulary: 400)",
        "user": "recorded nowhere; no effect on generation",
        "max_tokens": "supported (capped by the variant)",
        "max_completion_tokens": "supported (capped by the variant)",
        "logprobs": "supported (raw model distribution; needs the `logprobs` scope)",
        "top_logprobs": "supported (up to 20)",
        "echo": "supported (prompt log-probabilities)",
        "tools": "supported (rendered as text, parsed back)",
        "tool_choice": "supported",
        "parallel_tool_calls": "supported",
        "response_format": "`json_object` / `json_schema`: constrained decoding (llguidance); with tools: 400",
    }

    def __init__(self, config: LocalBackendConfig | None = None) -> None:
        self.config = config or LocalBackendConfig()
        self.spec = weights.resolve_model_spec(self.config.model, seed=self.config.seed)
        self.stats = BatchStats()
        self.content_hash: str | None = None
        self._loaded: weights.LoadedModel | None = None
        self._tokenizer: Any = None
        self._engine: Engine | None = None
        self._start_lock = threading.Lock()
        self._max_context = self.config.max_context
        self._grammar_tokenizer: Any = None  # llguidance's view of the tokenizer, built on first use

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> LocalBackend:
        """Build a backend from a manifest ``config`` mapping (see `LocalBackendConfig`)."""
        return cls(LocalBackendConfig.from_dict(config))

    # -- lifecycle

    async def start(self) -> None:
        """Load the model (converting a GGUF on first use) and start the batching worker."""
        with self._start_lock:  # no await inside: callers may run on different event loops
            engine = self._engine
            if engine is None or (engine.ready.done() and not engine.alive):
                engine = Engine(self.spec, self.config, self.stats)
                engine.start()
                self._engine = engine
        try:
            loaded = await asyncio.wrap_future(engine.ready)
        except AirlockError:
            raise
        except Exception as exc:  # unreadable cache, out of memory, ...: the backend is down, not the gateway
            raise BackendUnavailableError(f"cannot load model {self.spec.spec!r}: {type(exc).__name__}: {exc}") from exc
        if self._loaded is not loaded:
            self._loaded = loaded
            self._tokenizer = loaded.tokenizer
            self.content_hash = loaded.content_hash
            limit = getattr(loaded.model.config, "max_position_embeddings", None)
            if isinstance(limit, int) and limit > 0:
                self._max_context = min(self.config.max_context, limit)
            log.info("local backend ready: %s (%s)", self.spec.spec, loaded.content_hash[:12])

    async def aclose(self) -> None:
        """Stop the worker (failing unfinished requests) and release the model."""
        with self._start_lock:
            engine, self._engine = self._engine, None
        if engine is not None:
            await asyncio.to_thread(engine.stop)
        self._loaded = None

    # -- LoRA adapters

    async def load_adapter(self, name: str, path: Path) -> None:
        """Load LoRA adapter ``name`` (a ``save_pretrained`` dir) next to the base, without reloading it."""
        engine = await self._ready()
        await asyncio.wrap_future(engine.control(lambda: engine.load_adapter(name, Path(path))))

    @property
    def adapters(self) -> tuple[str, ...]:
        """Names of the loaded LoRA adapters."""
        engine = self._engine
        return tuple(engine.adapters) if engine is not None else ()

    def adapter_view(self, name: str) -> LocalBackend:
        """Return a backend that shares this one's worker and runs every request with adapter ``name``.

        Rows of different adapters share batches: peft applies each row's adapter (``adapter_names=``).
        """
        if name not in self.adapters:
            raise InvalidRequestError(f"adapter {name!r} is not loaded", param="model")
        return _AdapterView(self, name)

    async def _ready(self) -> Engine:
        engine = self._engine
        if engine is None or not engine.ready.done() or not engine.alive or self._loaded is None:
            await self.start()  # lazily, for callers that skip start()
            engine = self._engine
        assert engine is not None
        return engine

    @property
    def model(self) -> Any:
        """The loaded transformers model (after `start`); the worker thread runs it, so only read it."""
        if self._loaded is None:
            raise BackendUnavailableError("the local backend is not started")
        return self._loaded.model

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Token ids that end a generation (after `start`)."""
        return self._eos()

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer (loaded on first use)."""
        return self._tok()

    # -- tokens

    def count_tokens(self, text: str) -> int:
        """Return the number of tokens of ``text`` under the model's tokenizer."""
        return len(self._tok().encode(text, add_special_tokens=False))

    async def tokenize(self, request: tokenization.TokenizeRequest) -> tokenization.TokenizeResponse:
        """Tokenize like vLLM's ``/tokenize`` with the model's own tokenizer."""
        tok = self._tok()
        try:  # off the event loop: a long text takes a while
            return await asyncio.to_thread(tokenization.hf_tokenize, tok, request, self._max_context)
        except Exception as exc:  # the chat template refuses roles or shapes
            raise InvalidRequestError(f"the model's tokenizer rejected the request: {exc}") from exc

    async def detokenize(self, request: tokenization.DetokenizeRequest) -> tokenization.DetokenizeResponse:
        """Detokenize like vLLM's ``/detokenize``."""
        try:
            return await asyncio.to_thread(tokenization.hf_detokenize, self._tok(), request)
        except ValueError as exc:
            raise InvalidRequestError(str(exc), param="tokens") from exc

    async def tokenizer_info(self) -> dict[str, Any]:
        """Describe the tokenizer like vLLM's ``/tokenizer_info`` (the lab's paths left out)."""
        return tokenization.hf_tokenizer_info(self._tok())

    def _tok(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = weights.load_tokenizer(self.spec)
        return self._tokenizer

    def _chat_prompt(self, messages: list[ChatMessage], plan: tools.ToolPlan | None = None) -> list[int]:
        return list(self._tok()(self._chat_text(messages, plan), add_special_tokens=False)["input_ids"])

    def _chat_text(self, messages: list[ChatMessage], plan: tools.ToolPlan | None = None) -> str:
        tok = self._tok()
        plan = plan or tools.ToolPlan()
        # Tools and tool traffic become plain system/user/assistant text (see backends/tools.py).
        rendered = tools.render_messages(messages, plan)
        if getattr(tok, "chat_template", None):
            try:
                text = tok.apply_chat_template(rendered, add_generation_prompt=True, tokenize=False)
            except Exception as exc:  # jinja raises for roles/shapes a template refuses
                raise InvalidRequestError(f"the model's chat template rejected the messages: {exc}") from exc
        else:
            # A base model without a template: a plain transcript it can continue.
            text = "".join(f"{m['role']}: {m['content']}\n" for m in rendered) + "assistant:"
        # A forced tool call is started for the model; the prefix is part of its answer.
        return str(text) + plan.generation_prefix()

    async def _choose_required_function(self, request: ChatCompletionRequest, plan: tools.ToolPlan) -> tools.ToolPlan:
        """For ``tool_choice: "required"`` among several tools, force the function the model names.

        The model writes the name after ``<tool_call>{"name": "``, sampled with the request's own
        settings and stopped at the closing quote; `tools.match_function` maps the text onto an
        offered name (a small model may misspell one), which is then forced like a named
        ``tool_choice``. Nothing here reads a log-probability: the choice reveals only what
        sampling reveals, whatever the key's scopes.
        """
        if plan.mode != "required" or plan.forced is not None or not plan.active:
            return plan
        engine = await self._ready()
        prompt = self._chat_prompt(request.messages, plan)
        self._check_prompt(prompt, "the conversation")
        # Room for the longest offered name and its closing quote; the quote ends the row early.
        budget = min(max(self.count_tokens(name) for name in plan.names) + 2, self._max_context - len(prompt))
        device = torch.device(self.config.device)
        job = Job(asyncio.get_running_loop(), self._adapter)
        job.rows.append(
            Row(
                job,
                0,
                prompt,
                max_new=budget,
                temperature=request.temperature,
                top_p=request.top_p,
                generator=row_generator(request.seed, 0, device) if request.temperature > 0 else None,
                stops=['"'],
                logprobs=False,
                top_k=0,
                watermark=_watermark(request),
            )
        )
        written = ""
        engine.submit(job)
        async for events in self._events(job):
            written += "".join(ev.text for ev in events if isinstance(ev, Update))
        return dataclasses.replace(plan, forced=tools.match_function(written, plan.ordered_names))

    def _check_prompt(self, ids: list[int], what: str) -> None:
        if len(ids) > self._max_context:
            raise InvalidRequestError(
                f"{what} is {len(ids)} tokens long, more than this model's context of {self._max_context} tokens; "
                "shorten it",
                code="context_length_exceeded",
                param="messages" if what == "the conversation" else "prompt",
            )

    # -- logits processors

    def check_request(self, request: SamplingFields) -> None:
        """Refuse unknown fields, and combinations this backend cannot honour, before any work."""
        super().check_request(request)
        response_format = request.response_format if isinstance(request, ChatCompletionRequest) else None
        if response_format is not None and response_format.constraint() is not None:
            assert isinstance(request, ChatCompletionRequest)
            if tools.plan_tools(request).active:
                raise InvalidRequestError(
                    "this model cannot combine response_format with tools; send one of them",
                    code="unsupported_parameter",
                    param="response_format",
                )

    def _row_processors(self, request: SamplingFields, grammar: Any | None) -> list[LogitsProcessor]:
        """Return one row's processors: logit bias, then penalties, then the grammar (which must see them)."""
        device = torch.device(self.config.device)
        vocab = len(self._table().bytes)
        processors: list[LogitsProcessor] = []
        bias = request.token_bias()
        if bias:
            outside = sorted(t for t in bias if t >= vocab)
            if outside:
                raise InvalidRequestError(
                    f"logit_bias names token {outside[0]}, outside this model's vocabulary of {vocab}",
                    param="logit_bias",
                )
            processors.append(LogitBias(bias, device))
        if request.presence_penalty or request.frequency_penalty:
            processors.append(RepetitionPenalties(request.presence_penalty, request.frequency_penalty, vocab, device))
        if grammar is not None:
            processors.append(GrammarConstraint(grammar.deep_copy(), vocab))
        return processors

    async def _grammar(self, request: ChatCompletionRequest) -> Any | None:
        """Compile ``response_format`` into an llguidance matcher (400 when the schema cannot be compiled)."""
        schema = request.response_format.constraint() if request.response_format is not None else None
        if schema is None:
            return None
        import llguidance
        import llguidance.hf

        engine = await self._ready()
        if self._grammar_tokenizer is None:
            eos = sorted(engine.eos_ids)
            # About half a second for a 49k vocabulary: built once, off the event loop.
            self._grammar_tokenizer = await asyncio.to_thread(
                llguidance.hf.from_tokenizer, self._tok(), n_vocab=len(engine.table.bytes), eos_token=eos
            )
        try:
            # Separators with one space and no free whitespace: a small model can otherwise spend its
            # whole budget on whitespace between tokens (a schema's "x-guidance" may still override this).
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                schema, defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
            )
        except ValueError as exc:
            raise InvalidRequestError(f"response_format schema: {exc}", param="response_format") from None
        matcher = await asyncio.to_thread(llguidance.LLMatcher, self._grammar_tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise InvalidRequestError(
                f"response_format schema cannot be enforced: {matcher.get_error()}", param="response_format"
            )
        return matcher

    # -- chat

    def _chat_job(
        self, request: ChatCompletionRequest, plan: tools.ToolPlan, grammar: Any | None = None
    ) -> tuple[Job, int]:
        prompt = self._chat_prompt(request.messages, plan)
        self._check_prompt(prompt, "the conversation")
        budget = min(request.max_new_tokens(self.config.default_max_tokens), self._max_context - len(prompt))
        job = Job(asyncio.get_running_loop(), self._adapter)
        device = torch.device(self.config.device)
        for i in range(request.n):
            job.rows.append(
                Row(
                    job,
                    i,
                    prompt,
                    max_new=budget,
                    temperature=request.temperature,
                    top_p=request.top_p,
                    generator=row_generator(request.seed, i, device) if request.temperature > 0 else None,
                    stops=request.stop_list() + plan.stop_sequences(),
                    logprobs=request.logprobs,
                    top_k=request.top_logprobs or 0,
                    processors=self._row_processors(request, grammar),
                    watermark=_watermark(request),
                )
            )
        return job, len(prompt)

    async def chat(self, request: ChatCompletionRequest) -> ChatCompletion:
        """Return a chat completion, batched with whatever else is running; tool calls are parsed out."""
        engine = await self._ready()
        plan = await self._choose_required_function(request, tools.plan_tools(request))
        job, prompt_tokens = self._chat_job(request, plan, await self._grammar(request))
        texts = [""] * request.n
        tokens: list[list[Tok]] = [[] for _ in range(request.n)]
        finish: list[FinishReason | None] = [None] * request.n
        completion_tokens = 0
        engine.submit(job)
        async for events in self._events(job):
            for ev in events:
                if isinstance(ev, Update):
                    texts[ev.index] += ev.text
                    tokens[ev.index] += ev.tokens
                    if ev.finish_reason is not None:
                        finish[ev.index] = ev.finish_reason
                        completion_tokens += ev.completion_tokens
        choices = [self._chat_choice(i, texts[i], finish[i], tokens[i], request, plan) for i in range(request.n)]
        return ChatCompletion(
            model=request.model,
            choices=choices,
            usage=_usage(prompt_tokens, completion_tokens),
            system_fingerprint=self._fingerprint(),
        )

    def _chat_choice(
        self,
        index: int,
        text: str,
        finish: FinishReason | None,
        tokens: list[Tok],
        request: ChatCompletionRequest,
        plan: tools.ToolPlan,
    ) -> ChatChoice:
        logprobs = self._chat_logprobs(tokens, request) if request.logprobs else None
        if not plan.active:
            return ChatChoice(
                index=index, message=AssistantMessage(content=text), finish_reason=finish, logprobs=logprobs
            )
        parsed = tools.parse_generation(plan.generation_prefix() + text, plan)
        return ChatChoice(
            index=index,
            message=AssistantMessage(content=parsed.content, tool_calls=parsed.tool_calls or None),
            # A forced call cut short by max_tokens keeps "length": its arguments were closed by Airlock.
            finish_reason="tool_calls" if parsed.tool_calls and finish != "length" else finish,
            logprobs=logprobs,
        )

    def chat_stream(self, request: ChatCompletionRequest) -> AsyncIterator[ChatCompletionChunk]:
        """Yield chat chunks as tokens are produced; the last chunk has ``usage`` and no choices."""
        if tools.plan_tools(request).active:
            return self._chat_stream_buffered(request)
        return self._chat_stream(request)

    async def _chat_stream_buffered(self, request: ChatCompletionRequest) -> AsyncIterator[ChatCompletionChunk]:
        """Generate the whole answer, then stream it: content, tool-call deltas, finish, usage."""
        result = await self.chat(request)

        def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
            return ChatCompletionChunk(
                id=result.id, model=result.model, created=result.created, choices=choices, usage=usage
            )

        yield chunk(
            [ChatChunkChoice(index=c.index, delta=ChatDelta(role="assistant", content="")) for c in result.choices]
        )
        for choice in result.choices:
            message = choice.message
            if message.content:
                delta = ChatDelta(content=message.content)
                yield chunk([ChatChunkChoice(index=choice.index, delta=delta, logprobs=choice.logprobs)])
            elif choice.logprobs is not None and choice.logprobs.content:
                yield chunk([ChatChunkChoice(index=choice.index, delta=ChatDelta(), logprobs=choice.logprobs)])
            if message.tool_calls:
                delta = ChatDelta(tool_calls=tools.stream_tool_call_deltas(message.tool_calls))
                yield chunk([ChatChunkChoice(index=choice.index, delta=delta)])
            yield chunk([ChatChunkChoice(index=choice.index, delta=ChatDelta(), finish_reason=choice.finish_reason)])
        yield chunk([], result.usage)

    async def _chat_stream(self, request: ChatCompletionRequest) -> AsyncIterator[ChatCompletionChunk]:
        engine = await self._ready()
        job, prompt_tokens = self._chat_job(request, tools.plan_tools(request), await self._grammar(request))
        chunk_id, created = new_id("chatcmpl-"), now_ts()

        def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=chunk_id, model=request.model, created=created, choices=choices, usage=usage)

        completion_tokens = 0
        engine.submit(job)  # before the first yield: generation starts while the client reads it
        events = self._events(job)
        try:
            yield chunk(
                [ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content="")) for i in range(request.n)]
            )
            async for batch in events:
                for ev in batch:
                    if not isinstance(ev, Update):
                        continue
                    completion_tokens += ev.completion_tokens
                    logprobs = self._chat_logprobs(ev.tokens, request) if request.logprobs else None
                    delta = ChatDelta(content=ev.text if ev.text or ev.finish_reason is None else None)
                    yield chunk(
                        [
                            ChatChunkChoice(
                                index=ev.index, delta=delta, finish_reason=ev.finish_reason, logprobs=logprobs
                            )
                        ]
                    )
            yield chunk([], _usage(prompt_tokens, completion_tokens))
        finally:
            job.cancelled = True  # a client that disconnects closes this generator: drop its rows
            await events.aclose()

    def _chat_logprobs(self, tokens: list[Tok], request: ChatCompletionRequest) -> ChoiceLogprobs:
        table = self._table()
        k = request.top_logprobs or 0
        return ChoiceLogprobs(
            content=[
                TokenLogprob(
                    token=table.text(t.id),
                    logprob=_finite(t.logprob),
                    bytes=list(table.bytes[t.id]),
                    top_logprobs=[
                        TopLogprob(token=table.text(i), logprob=_finite(v), bytes=list(table.bytes[i]))
                        for i, v in (t.top or ())[:k]
                    ],
                )
                for t in tokens
            ]
        )

    # -- completions

    def _completion_job(self, request: CompletionRequest) -> tuple[Job, int, list[str]]:
        tok = self._tok()
        job = Job(asyncio.get_running_loop(), self._adapter)
        device = torch.device(self.config.device)
        prompt_tokens = 0
        echo_texts: list[str] = []
        table = self._table()
        prompts = request.prompts()
        for p_index, prompt in enumerate(prompts):
            skip = 0
            if isinstance(prompt, str):
                ids = list(tok(prompt, add_special_tokens=True)["input_ids"])
                echo_text = prompt
            else:
                ids = list(prompt)
                bad = [i for i in ids if not 0 <= i < len(table.bytes)]
                if bad:
                    raise InvalidRequestError(f"prompt token id {bad[0]} is outside the vocabulary", param="prompt")
                echo_text = table.decode(ids)
            if not ids:
                # The model needs one token to condition on; it is not part of the echoed prompt.
                start = tok.bos_token_id if tok.bos_token_id is not None else next(iter(sorted(self._eos())), 0)
                ids, skip = [int(start)], 1
            what = "the prompt" if len(prompts) == 1 else f"prompt {p_index}"
            self._check_prompt(ids, what)
            prompt_tokens += len(ids) - skip
            budget = min(request.max_tokens, self._max_context - len(ids))
            for j in range(request.n):
                index = p_index * request.n + j
                echo_texts.append(echo_text if request.echo else "")
                job.rows.append(
                    Row(
                        job,
                        index,
                        ids,
                        max_new=budget,
                        temperature=request.temperature,
                        top_p=request.top_p,
                        generator=row_generator(request.seed, index, device) if request.temperature > 0 else None,
                        stops=request.stop_list(),
                        logprobs=request.logprobs is not None,
                        top_k=request.logprobs or 0,
                        prompt_logprobs=request.echo and request.logprobs is not None,
                        skip_prompt_tokens=skip,
                        processors=self._row_processors(request, None),
                        watermark=_watermark(request),
                    )
                )
        return job, prompt_tokens, echo_texts

    async def complete(self, request: CompletionRequest) -> Completion:
        """Return a text completion (``echo`` + ``logprobs`` + ``max_tokens=0`` scores a prompt)."""
        engine = await self._ready()
        job, prompt_tokens, echo_texts = self._completion_job(request)
        count = len(job.rows)
        texts = list(echo_texts)
        logprobs: list[CompletionLogprobs] = [CompletionLogprobs() for _ in range(count)]
        finish: list[FinishReason | None] = [None] * count
        completion_tokens = 0
        engine.submit(job)
        async for events in self._events(job):
            for ev in events:
                if isinstance(ev, PromptInfo):
                    self._extend_legacy(logprobs[ev.index], ev.tokens, 0, request.logprobs or 0)
                    continue
                if request.logprobs is not None:
                    base = len(echo_texts[ev.index])
                    self._extend_legacy(logprobs[ev.index], ev.tokens, base, request.logprobs)
                texts[ev.index] += ev.text
                if ev.finish_reason is not None:
                    finish[ev.index] = ev.finish_reason
                    completion_tokens += ev.completion_tokens
        choices = [
            CompletionChoice(
                index=i,
                text=texts[i],
                finish_reason=finish[i],
                logprobs=logprobs[i] if request.logprobs is not None else None,
            )
            for i in range(count)
        ]
        return Completion(
            model=request.model,
            choices=choices,
            usage=_usage(prompt_tokens, completion_tokens),
            system_fingerprint=self._fingerprint(),
        )

    def complete_stream(self, request: CompletionRequest) -> AsyncIterator[Completion]:
        """Yield completion chunks as tokens are produced; the last chunk has ``usage`` and no choices."""
        return self._complete_stream(request)

    async def _complete_stream(self, request: CompletionRequest) -> AsyncIterator[Completion]:
        engine = await self._ready()
        job, prompt_tokens, echo_texts = self._completion_job(request)
        chunk_id, created, fingerprint = new_id("cmpl-"), now_ts(), self._fingerprint()
        wants = request.logprobs is not None

        def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> Completion:
            return Completion(
                id=chunk_id,
                model=request.model,
                created=created,
                choices=choices,
                usage=usage,
                system_fingerprint=fingerprint,
            )

        completion_tokens = 0
        echoed: set[int] = set()
        engine.submit(job)
        events = self._events(job)
        try:
            async for batch in events:
                for ev in batch:
                    lp = CompletionLogprobs() if wants else None
                    text = ""
                    if ev.index not in echoed:
                        # The echoed prompt leads the choice's first chunk.
                        echoed.add(ev.index)
                        text = echo_texts[ev.index]
                    if isinstance(ev, PromptInfo):
                        if lp is not None:
                            self._extend_legacy(lp, ev.tokens, 0, request.logprobs or 0)
                        yield chunk([CompletionChoice(index=ev.index, text=text, finish_reason=None, logprobs=lp)])
                        continue
                    if lp is not None:
                        self._extend_legacy(lp, ev.tokens, len(echo_texts[ev.index]), request.logprobs or 0)
                    completion_tokens += ev.completion_tokens
                    choice = CompletionChoice(
                        index=ev.index, text=text + ev.text, finish_reason=ev.finish_reason, logprobs=lp
                    )
                    yield chunk([choice])
            yield chunk([], _usage(prompt_tokens, completion_tokens))
        finally:
            job.cancelled = True
            await events.aclose()

    def _extend_legacy(self, out: CompletionLogprobs, tokens: list[Tok], base: int, k: int) -> None:
        table = self._table()
        for t in tokens:
            out.tokens.append(table.text(t.id))
            out.token_logprobs.append(None if t.logprob is None else _finite(t.logprob))
            out.top_logprobs.append(None if t.top is None else {table.text(i): _finite(v) for i, v in t.top[:k]})
            out.text_offset.append(base + t.offset)

    # -- plumbing

    async def _events(self, job: Job) -> AsyncGenerator[list[Event], None]:
        """Yield the event batches of a submitted ``job`` until every row finished; cancel on exit."""
        remaining = len(job.rows)
        try:
            while remaining:
                item = await job.queue.get()
                if isinstance(item, BaseException):
                    raise item
                remaining -= sum(1 for ev in item if isinstance(ev, Update) and ev.finish_reason is not None)
                yield item
        finally:
            # Client gone, error, or done: the worker drops any rows still running at its next step.
            job.cancelled = True

    def run_with_model(self, fn: Callable[[Any, Any], T]) -> concurrent.futures.Future[T]:
        """Run ``fn(model, tokenizer)`` on the backend's worker thread between batching steps.

        For work that needs the loaded weights directly (remote interpretability hooks) without
        a second torch thread or a second copy of the model.
        """
        engine = self._engine
        if engine is None:
            raise BackendUnavailableError("the local backend is not started")
        out: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                out.set_result(fn(engine.model, self.tokenizer))
            except BaseException as exc:  # delivered to whoever waits on the future
                out.set_exception(exc)

        engine.control(run)
        return out

    def _table(self) -> TokenTable:
        if self._engine is None:
            raise BackendUnavailableError("the local backend is not started")
        return self._engine.table

    def _eos(self) -> frozenset[int]:
        if self._engine is None:
            raise BackendUnavailableError("the local backend is not started")
        return self._engine.eos_ids

    def _fingerprint(self) -> str | None:
        return f"local-{self.content_hash[:12]}" if self.content_hash else None


def _watermark(request: ChatCompletionRequest | CompletionRequest) -> WatermarkStream | None:
    """Return a row's watermark stream when the request carries a key and samples (temperature > 0)."""
    key = request.watermark_key
    if key is None or request.temperature <= 0:
        return None
    return WatermarkStream.start(key)


def _finite(value: float | None) -> float:
    if value is None or value != value:  # None or NaN
        return _LOGPROB_FLOOR
    return max(value, _LOGPROB_FLOOR)


def _usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


class _AdapterView(AdapterViewMixin, LocalBackend):
    """A `LocalBackend` facade whose requests run with one LoRA adapter on the parent's worker."""
