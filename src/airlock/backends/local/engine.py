"""Local transformers backend: one worker thread batches all concurrent requests into shared forward passes.

Design (measured on a 2-core CPU with SmolLM2-135M): one decode step costs ~29 ms for one row and
~64 ms for 16 rows, so batching concurrent requests multiplies throughput. A single worker thread
owns the model. Requests are split into rows (one per choice and prompt) and queued; the worker
admits rows between decode steps (continuous batching): newcomers are prefilled together,
left-padded, and their KV cache is merged into the running batch; finished or cancelled rows are
dropped from the batch at once. Tokens reach each request's asyncio queue through
``loop.call_soon_threadsafe``, so the event loop never blocks on the model.

Sampling is per row (temperature, top-p, a per-row ``torch.Generator`` seeded from the request
seed), so a seeded request gives the same output whether it runs alone or batched with others.
Reported log-probabilities are those of the model's raw distribution (before temperature/top-p),
as vLLM does. ``presence_penalty`` and ``frequency_penalty`` are accepted and ignored.

Tool calling uses the prompt format of :mod:`airlock.backends.tools` for every model (SmolLM2's
template has no tool support): tools and tool traffic are rendered as text, a forced
``tool_choice`` starts the answer with the call, and the generated text is parsed back into
``tool_calls``. A streamed request that offers tools is generated whole, then sent as chunks, since
a call can only be recognised once its text is complete.
"""

from __future__ import annotations

import asyncio
import codecs
import concurrent.futures
import dataclasses
import inspect
import json
import logging
import queue
import re
import secrets
import threading
import time
import warnings
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F

from airlock.backends import tools, weights
from airlock.backends.base import ModelBackend
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
    TokenLogprob,
    TopLogprob,
    Usage,
    new_id,
    now_ts,
)
from airlock.errors import (
    AirlockError,
    BackendError,
    BackendUnavailableError,
    ConfigError,
    InvalidRequestError,
)

__all__ = ["BatchStats", "LocalBackend", "LocalBackendConfig"]

log = logging.getLogger(__name__)
T = TypeVar("T")

# JSON cannot carry -inf; a masked-out token is reported at this floor instead.
_LOGPROB_FLOOR = -9999.0
# Prompt log-probabilities need full-vocabulary logits for every prompt position; cap the logits
# one prefill materialises (positions x vocab floats) so an echo batch cannot exhaust memory.
_ECHO_LOGITS_BUDGET = 64 * 1024 * 1024


# ---------------------------------------------------------------- configuration


@dataclass(frozen=True)
class LocalBackendConfig:
    """Settings of a local backend (the ``config`` mapping of a ``backend: local`` variant)."""

    model: str = weights.DEFAULT_MODEL_SPEC
    max_batch_size: int = 16
    batch_wait_ms: float = 5.0
    default_max_tokens: int = 256
    max_context: int = 2048
    device: str = "cpu"
    seed: int | None = None
    dtype: str = "float32"
    continuous_batching: bool = True

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> LocalBackendConfig:
        """Validate ``config``; unknown keys and wrong types are configuration errors."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ConfigError(f"local backend: unknown config key(s) {unknown} (known: {sorted(known)})")
        values = dict(config)

        def check_int(key: str, low: int) -> None:
            value = values.get(key)
            if value is None:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"local backend: {key} must be an integer >= {low}, not {value!r}")

        for key, low in (("max_batch_size", 1), ("default_max_tokens", 1), ("max_context", 2), ("seed", 0)):
            check_int(key, low)
        wait = values.get("batch_wait_ms", 5.0)
        if isinstance(wait, bool) or not isinstance(wait, int | float) or wait < 0:
            raise ConfigError(f"local backend: batch_wait_ms must be a number >= 0, not {wait!r}")
        for key in ("model", "device", "dtype"):
            if key in values and not isinstance(values[key], str):
                raise ConfigError(f"local backend: {key} must be a string, not {values[key]!r}")
        if "continuous_batching" in values and not isinstance(values["continuous_batching"], bool):
            raise ConfigError("local backend: continuous_batching must be true or false")
        return cls(**values)


@dataclass
class BatchStats:
    """Counters of the batching worker (read them for tests, benchmarks and metrics)."""

    requests: int = 0
    rows: int = 0
    prefills: int = 0
    prefill_tokens: int = 0
    decode_steps: int = 0
    tokens_generated: int = 0
    max_batch_rows_seen: int = 0
    merges: int = 0
    cancelled_rows: int = 0
    failed_requests: int = 0

    def as_dict(self) -> dict[str, int]:
        """Return the counters as a plain dict."""
        return asdict(self)


# ---------------------------------------------------------------- tokens → bytes


def _bytes_to_unicode() -> dict[int, str]:
    """Return GPT-2's byte → printable-character map used by byte-level BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def _decoder_types(tokenizer: Any) -> set[str]:
    """Return the ``type`` names inside the fast tokenizer's decoder (empty for slow tokenizers)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    if decoder is None:
        return set()
    try:
        state = json.loads(decoder.__getstate__())
    except (TypeError, ValueError, AttributeError):
        return {type(decoder).__name__}
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("type"), str):
                found.add(node["type"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(state)
    return found


class _TokenTable:
    """The exact bytes of every token id, so text is decoded incrementally from a byte stream.

    Decoding bytes (rather than re-decoding token lists) makes streaming exact: a multi-byte
    character split across tokens is emitted once its last byte arrives, never as garbage.
    """

    _SP_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        size = max(vocab_size, len(tokenizer))
        tokens: list[str | None] = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        added = set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
        kinds = _decoder_types(tokenizer)
        byte_decoder = {c: b for b, c in _bytes_to_unicode().items()}
        table: list[bytes] = []
        for token_id, token in enumerate(tokens):
            if token is None:
                table.append(b"")
            elif token_id in added:
                table.append(token.encode())  # special/added tokens are literal text
            elif "ByteLevel" in kinds:
                try:
                    table.append(bytes(byte_decoder[c] for c in token))
                except KeyError:
                    table.append(token.encode())
            elif "ByteFallback" in kinds or "Metaspace" in kinds:
                match = self._SP_BYTE.fullmatch(token)
                table.append(bytes([int(match.group(1), 16)]) if match else token.replace("▁", " ").encode())
            else:
                table.append(tokenizer.decode([token_id]).encode())
        table.extend(b"" for _ in range(size - len(table)))
        self.bytes: list[bytes] = table
        self._text: dict[int, str] = {}

    def text(self, token_id: int) -> str:
        r"""Return a display string for one token (``bytes:\xNN`` for partial UTF-8, as OpenAI does)."""
        cached = self._text.get(token_id)
        if cached is None:
            raw = self.bytes[token_id] if 0 <= token_id < len(self.bytes) else b""
            try:
                cached = raw.decode("utf-8")
            except UnicodeDecodeError:
                cached = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
            self._text[token_id] = cached
        return cached

    def decode(self, ids: Sequence[int]) -> str:
        """Return the text of ``ids`` (invalid UTF-8 replaced)."""
        return b"".join(self.bytes[i] for i in ids).decode("utf-8", errors="replace")

    def offsets(self, ids: Sequence[int]) -> list[int]:
        """Return the character offset at which each token's text starts in ``decode(ids)``."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        out: list[int] = []
        length = 0
        for token_id in ids:
            out.append(length)
            length += len(decoder.decode(self.bytes[token_id]))
        return out


# ---------------------------------------------------------------- worker data


@dataclass(frozen=True, slots=True)
class _Tok:
    """One token with its log-probability and top alternatives."""

    id: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] | None
    offset: int = 0  # character offset of the token's text within the row's text


@dataclass(slots=True)
class _Update:
    """What one row produced in one step: released text, tokens, maybe its end."""

    index: int
    text: str = ""
    tokens: list[_Tok] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    completion_tokens: int = 0


@dataclass(slots=True)
class _PromptInfo:
    """Prompt log-probabilities of one row (for ``echo`` with ``logprobs``)."""

    index: int
    tokens: list[_Tok]


_Event = _Update | _PromptInfo


class _Job:
    """One request: its rows, and the asyncio queue its events are delivered to."""

    def __init__(self, loop: asyncio.AbstractEventLoop, adapter: str | None = None) -> None:
        self.loop = loop
        self.adapter = adapter  #: LoRA adapter the rows run with (``None``: the base model)
        self.queue: asyncio.Queue[list[_Event] | BaseException] = asyncio.Queue()
        self.rows: list[_Row] = []
        # Written by the event loop, read by the worker: plain attributes suffice under the GIL.
        self.cancelled = False
        self.failed = False

    @property
    def dead(self) -> bool:
        """Whether the worker should drop this job's rows."""
        return self.cancelled or self.failed

    def deliver(self, events: list[_Event]) -> None:
        """Hand ``events`` to the request's coroutine (from the worker thread)."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, events)
        except RuntimeError:  # the client's event loop is gone: nobody is listening
            self.cancelled = True

    def fail(self, exc: BaseException) -> None:
        """Fail the request with ``exc`` and stop its rows (from the worker thread)."""
        if self.failed:
            return
        self.failed = True
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, exc)
        except RuntimeError:
            self.cancelled = True


class _Row:
    """One generated sequence (a choice), with its sampling settings and detokenization state."""

    def __init__(
        self,
        job: _Job,
        index: int,
        prompt_ids: list[int],
        *,
        max_new: int,
        temperature: float,
        top_p: float,
        generator: torch.Generator | None,
        stops: Sequence[str],
        logprobs: bool,
        top_k: int,
        prompt_logprobs: bool = False,
        skip_prompt_tokens: int = 0,
    ) -> None:
        self.job = job
        self.index = index
        self.prompt_ids = prompt_ids
        self.max_new = max_new
        self.temperature = temperature
        self.top_p = top_p
        self.generator = generator
        self.stops = tuple(stops)
        self.max_stop = max((len(s) for s in self.stops), default=0)
        self.logprobs = logprobs
        self.top_k = top_k if logprobs else 0
        self.prompt_logprobs = prompt_logprobs
        self.skip_prompt_tokens = skip_prompt_tokens
        self.generated = 0
        self.text = ""
        self.released = 0
        self.pending: list[_Tok] = []
        self.finish_reason: FinishReason | None = None
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def accept(
        self, token_id: int, logprob: float, top: tuple[tuple[int, float], ...] | None, engine: _Engine
    ) -> _Update | None:
        """Append one sampled token; return what can be released to the client now."""
        self.generated += 1
        if token_id in engine.eos_ids:
            self._finish("stop")
        else:
            start = len(self.text)
            self.text += self._decoder.decode(engine.table.bytes[token_id])
            if self.logprobs:
                self.pending.append(_Tok(token_id, logprob, top if self.top_k else None, start))
            cut = self._find_stop(start)
            if cut is not None:
                self._finish("stop", cut)
            elif self.generated >= self.max_new:
                self._finish("length")
        return self.release()

    def _find_stop(self, start: int) -> int | None:
        if not self.stops:
            return None
        # Only a stop string overlapping the new text can be new.
        origin = max(0, start - self.max_stop + 1)
        hits = [p for p in (self.text.find(s, origin) for s in self.stops) if p >= 0]
        return min(hits) if hits else None

    def _finish(self, reason: FinishReason, cut: int | None = None) -> None:
        if cut is None:
            self.text += self._decoder.decode(b"", final=True)  # a dangling partial character
        else:
            self.text = self.text[:cut]
            self.pending = [t for t in self.pending if t.offset < cut]
        self.finish_reason = reason

    def _holdback(self) -> int:
        """Return how many trailing characters might be the start of a stop string."""
        longest = min(self.max_stop - 1, len(self.text) - self.released)
        for k in range(longest, 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0

    def release(self) -> _Update | None:
        """Return the text and tokens that can no longer change, and mark them sent."""
        done = self.finish_reason is not None
        end = len(self.text) if done else len(self.text) - self._holdback()
        end = max(end, self.released)
        text = self.text[self.released : end]
        self.released = end
        if done:
            tokens, self.pending = self.pending, []
        else:
            tokens = [t for t in self.pending if t.offset < end]
            self.pending = self.pending[len(tokens) :]
        if not text and not tokens and not done:
            return None
        return _Update(
            index=self.index,
            text=text,
            tokens=tokens,
            finish_reason=self.finish_reason,
            completion_tokens=self.generated if done else 0,
        )

    def finish_empty(self) -> _Update:
        """End a row that has no generation budget (``max_tokens=0`` or a full context)."""
        self.finish_reason = "length"
        return _Update(index=self.index, finish_reason="length", completion_tokens=0)


@dataclass
class _Batch:
    """KV cache and per-row state of the rows currently decoding together."""

    rows: list[_Row]
    cache: Any  # transformers Cache
    mask: torch.Tensor  # [B, T] 1 = real token, 0 = left padding
    next_pos: torch.Tensor  # [B] position id of each row's next token
    logits: torch.Tensor  # [B, V] float32 logits for each row's next token


# ---------------------------------------------------------------- the worker


@dataclass
class _Control:
    """A function the worker runs between steps (it owns the model), with its result future."""

    fn: Callable[[], None]
    done: concurrent.futures.Future[None]


_BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed batch (``adapter_names=``)


class _Engine:
    """Owns the model on one thread and runs the batched prefill / decode loop.

    The thread also loads the model. On a small CPU this matters: every live thread that has run
    a parallel torch op owns an OpenMP team, and once teams outnumber the cores libgomp stops
    spin-waiting, which cost ~40% of decode speed here (32 → 19 tokens/s). Loading in an
    executor thread that then idles would leave exactly such a team behind.
    """

    model: Any
    table: _TokenTable
    vocab_size: int
    pad_id: int
    eos_ids: frozenset[int]

    def __init__(self, spec: weights.ModelSpec, config: LocalBackendConfig, stats: BatchStats) -> None:
        self.spec = spec
        self.config = config
        self.stats = stats
        self.device = torch.device(config.device)
        #: Resolves to the loaded model once the worker is serving (or to the load error).
        self.ready: concurrent.futures.Future[weights.LoadedModel] = concurrent.futures.Future()
        self.inbox: queue.SimpleQueue[_Job | _Control | None] = queue.SimpleQueue()
        self.adapters: dict[str, Path] = {}  # loaded LoRA adapters (the model is a PeftModel once non-empty)
        self.pending: deque[_Row] = deque()
        self.batch: _Batch | None = None
        self.mergeable: bool | None = None  # decided on the first prefill (plain KV layers only)
        self._cache_arg = "cache"
        self._stopping = False
        self._thread = threading.Thread(target=self._main, name="airlock-local-backend", daemon=True)

    def _load(self) -> weights.LoadedModel:
        loaded = weights.load_model(self.spec, device=self.config.device, dtype=self.config.dtype)
        self.model = loaded.model
        tokenizer = loaded.tokenizer
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        self.table = _TokenTable(tokenizer, self.vocab_size)
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        self.eos_ids = _eos_ids(loaded)
        # transformers 5.24 renamed the KV-cache argument ``past_key_values`` to ``cache``.
        params = inspect.signature(self.model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        return loaded

    # -- lifecycle (event-loop side)

    def start(self) -> None:
        """Start the worker thread (it loads the model, then serves; see `ready`)."""
        self._thread.start()

    def submit(self, job: _Job) -> None:
        """Queue ``job`` for the worker."""
        if not self._thread.is_alive() or self._stopping:
            raise BackendUnavailableError("the local backend is not running")
        self.inbox.put(job)

    def control(self, fn: Callable[[], None]) -> concurrent.futures.Future[None]:
        """Run ``fn`` on the worker thread between steps; the future resolves when it has run."""
        if not self._thread.is_alive() or self._stopping:
            raise BackendUnavailableError("the local backend is not running")
        item = _Control(fn, concurrent.futures.Future())
        self.inbox.put(item)
        return item.done

    def load_adapter(self, name: str, path: Path) -> None:
        """Add LoRA adapter ``name`` from ``path`` to the model (worker thread only)."""
        from peft import PeftModel

        if name == _BASE_ADAPTER or name in self.adapters:
            raise InvalidRequestError(f"adapter {name!r} is already loaded")
        with warnings.catch_warnings():
            # peft 0.21 trips a transformers 5 deprecation; not ours to fix.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            if not self.adapters:
                self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=name)
            else:
                self.model.load_adapter(str(path), adapter_name=name)
        self.model.eval()
        self.adapters[name] = path

    def _adapter_kwargs(self, adapters: Sequence[str | None]) -> dict[str, Any]:
        """Return ``adapter_names=`` for a forward pass: peft applies each row's adapter (or none)."""
        if not self.adapters:
            return {}
        return {"adapter_names": [_BASE_ADAPTER if a is None else a for a in adapters]}

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the worker, failing whatever is still queued or running (blocking)."""
        self._stopping = True
        self.inbox.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        """Whether the worker thread is running."""
        return self._thread.is_alive()

    # -- worker thread

    def _main(self) -> None:
        try:
            loaded = self._load()
        except BaseException as exc:  # reported to whoever awaits `ready`
            self.ready.set_exception(exc)
            return
        self.ready.set_result(loaded)
        self._run()

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                try:
                    if not self._admit():
                        break
                    if self.batch is not None:
                        self._step()
                except Exception as exc:  # a bug or OOM: fail the affected requests, keep serving
                    log.exception("local backend step failed")
                    self._fail_batch(exc)
        self._shutdown()

    def _shutdown(self) -> None:
        error = BackendUnavailableError("the local backend shut down before the request finished")
        jobs = {r.job for r in self.pending}
        if self.batch is not None:
            jobs |= {r.job for r in self.batch.rows}
        while True:
            try:
                job = self.inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(job, _Control):
                job.done.set_exception(error)
            elif job is not None:
                jobs.add(job)
        for job in jobs:
            job.fail(error)
        self.pending.clear()
        self.batch = None

    def _enqueue(self, job: _Job | _Control | None) -> None:
        if job is None:
            self._stopping = True
            return
        if isinstance(job, _Control):
            try:
                job.fn()
            except Exception as exc:
                job.done.set_exception(exc)
            else:
                job.done.set_result(None)
            return
        self.stats.requests += 1
        self.pending.extend(job.rows)

    def _admit(self) -> bool:
        """Take queued requests; prefill and merge as many rows as the batch has room for."""
        cap = self.config.max_batch_size
        if self.batch is None and not self.pending:
            self._enqueue(self.inbox.get())  # idle: sleep until work arrives
            # Wait briefly for concurrent requests so they share the first prefill.
            deadline = time.monotonic() + self.config.batch_wait_ms / 1000
            while not self._stopping and len(self.pending) < cap:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    self._enqueue(self.inbox.get(timeout=remaining))
                except queue.Empty:
                    break
        while True:
            try:
                self._enqueue(self.inbox.get_nowait())
            except queue.Empty:
                break
        if self._stopping:
            return False
        while self.pending and self.pending[0].job.dead:
            self.pending.popleft()
            self.stats.cancelled_rows += 1
        busy = len(self.batch.rows) if self.batch is not None else 0
        if busy and not (self.config.continuous_batching and self.mergeable):
            return True  # static batching: newcomers wait for the running batch to finish
        new: list[_Row] = []
        while self.pending and busy + len(new) < cap:
            row = self.pending.popleft()
            if row.job.dead:
                self.stats.cancelled_rows += 1
            else:
                new.append(row)
        if new:
            self._prefill_rows(new)
        return True

    def _prefill_rows(self, rows: list[_Row]) -> None:
        """Prefill ``rows`` (echo rows in bounded groups) and merge those still generating."""
        plain = [r for r in rows if not r.prompt_logprobs]
        echo = [r for r in rows if r.prompt_logprobs]
        groups: list[tuple[list[_Row], bool]] = [(plain, False)] if plain else []
        current: list[_Row] = []
        for row in echo:
            longest = max([len(r.prompt_ids) for r in current] + [len(row.prompt_ids)])
            if current and (len(current) + 1) * longest * self.vocab_size * 4 > _ECHO_LOGITS_BUDGET:
                groups.append((current, True))
                current = []
            current.append(row)
        if current:
            groups.append((current, True))
        for group, full in groups:
            if self.batch is not None and self.mergeable is False and any(r.max_new > 0 for r in group):
                # This model's cache cannot be merged (e.g. sliding-window layers): wait for the batch.
                self.pending.extendleft(reversed(group))
                continue
            try:
                batch = self._prefill(group, full)
            except Exception as exc:
                log.exception("local backend prefill failed")
                for job in {r.job for r in group}:
                    self._fail_job(job, exc)
                continue
            if batch is not None:
                self._merge(batch)

    def _prefill(self, rows: list[_Row], full_logits: bool) -> _Batch | None:
        """Run the prompts of ``rows`` through the model, left-padded, identical prompts once."""
        # Identical prompts run once per adapter: the same prompt under two adapters differs.
        unique: dict[tuple[str | None, tuple[int, ...]], int] = {}
        which: list[int] = []
        for row in rows:
            which.append(unique.setdefault((row.job.adapter, tuple(row.prompt_ids)), len(unique)))
        prompts = [prompt for _adapter, prompt in unique]
        generating = [r for r in rows if r.max_new > 0]
        if not generating and not full_logits:  # plain echo with max_tokens=0: nothing to compute
            self.stats.rows += len(rows)
            for job, events in _group((r.job, r.finish_empty()) for r in rows if not r.job.dead).items():
                job.deliver(events)
            return None
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for u, prompt in enumerate(prompts):
            ids[u, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[u, width - len(prompt) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=positions.to(self.device),
            use_cache=bool(generating),
            logits_to_keep=0 if full_logits else 1,
            **self._adapter_kwargs([adapter for adapter, _prompt in unique]),
        )
        self.stats.prefills += 1
        self.stats.prefill_tokens += sum(len(p) for p in prompts)
        self.stats.rows += len(rows)
        self.stats.max_batch_rows_seen = max(self.stats.max_batch_rows_seen, len(rows))
        logits = out.logits
        if full_logits:
            self._send_prompt_logprobs(rows, which, prompts, logits)
        for job, events in _group((r.job, r.finish_empty()) for r in rows if r.max_new <= 0 and not r.job.dead).items():
            job.deliver(events)
        if not generating:
            return None
        keep = [which[i] for i, r in enumerate(rows) if r.max_new > 0]
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        cache = self._cache_of(out)
        if self.mergeable is None:
            self.mergeable = _plain_dynamic_cache(cache)
        if keep != list(range(len(prompts))):
            cache.batch_select_indices(index)
        mask = mask.to(self.device)[index]
        return _Batch(
            rows=generating,
            cache=cache,
            mask=mask,
            next_pos=mask.sum(-1),
            logits=logits[:, -1, :].float()[index],
        )

    def _send_prompt_logprobs(
        self, rows: list[_Row], which: list[int], prompts: list[tuple[int, ...]], logits: torch.Tensor
    ) -> None:
        width = logits.shape[1]
        per_prompt: dict[tuple[int, int], list[_Tok]] = {}
        by_job: dict[_Job, list[_Event]] = {}
        for row, u in zip(rows, which, strict=True):
            key = (u, row.top_k)
            if key not in per_prompt:
                prompt = prompts[u]
                offsets = self.table.offsets(prompt)
                toks = [_Tok(prompt[0], None, None, offsets[0])]
                if len(prompt) > 1:
                    # Position t predicts token t+1: the logits for the prompt's own tokens.
                    lp = torch.log_softmax(logits[u, width - len(prompt) : width - 1].float(), dim=-1)
                    target = torch.tensor(prompt[1:], dtype=torch.long, device=lp.device)
                    chosen = lp.gather(1, target[:, None])[:, 0].tolist()
                    tops: list[tuple[tuple[int, float], ...] | None]
                    if row.top_k > 0:
                        values, indices = lp.topk(row.top_k, dim=-1)
                        tops = [
                            tuple(zip(i_row, v_row, strict=True))
                            for i_row, v_row in zip(indices.tolist(), values.tolist(), strict=True)
                        ]
                    else:
                        tops = [() for _ in chosen]
                    toks += [
                        _Tok(tid, c, t, off)
                        for tid, c, t, off in zip(prompt[1:], chosen, tops, offsets[1:], strict=True)
                    ]
                per_prompt[key] = toks
            toks = per_prompt[key][row.skip_prompt_tokens :]
            by_job.setdefault(row.job, []).append(_PromptInfo(row.index, toks))
        for job, events in by_job.items():
            if not job.dead:
                job.deliver(events)

    def _merge(self, new: _Batch) -> None:
        """Add ``new`` rows to the running batch, left-padding the shorter KV history."""
        old = self.batch
        if old is None:
            self.batch = new
            return
        self.stats.merges += 1
        width = max(old.mask.shape[1], new.mask.shape[1])

        def pad(t: torch.Tensor, dim_from_end: int) -> torch.Tensor:
            missing = width - t.shape[-dim_from_end]
            if missing == 0:
                return t
            spec = [0, 0] * (dim_from_end - 1) + [missing, 0]
            return F.pad(t, spec)

        for old_layer, new_layer in zip(old.cache.layers, new.cache.layers, strict=True):
            old_layer.keys = torch.cat([pad(old_layer.keys, 2), pad(new_layer.keys, 2)])
            old_layer.values = torch.cat([pad(old_layer.values, 2), pad(new_layer.values, 2)])
        self.batch = _Batch(
            rows=old.rows + new.rows,
            cache=old.cache,
            mask=torch.cat([pad(old.mask, 1), pad(new.mask, 1)]),
            next_pos=torch.cat([old.next_pos, new.next_pos]),
            logits=torch.cat([old.logits, new.logits]),
        )

    def _step(self) -> None:
        """Sample one token for every row, deliver it, drop finished rows, run one decode forward."""
        batch = self.batch
        assert batch is not None
        rows = batch.rows
        self.stats.max_batch_rows_seen = max(self.stats.max_batch_rows_seen, len(rows))
        logprobs = torch.log_softmax(batch.logits, dim=-1)
        next_ids = logprobs.argmax(dim=-1)
        broken: set[_Job] = set()
        for i, row in enumerate(rows):
            if row.temperature > 0 and not row.job.dead:
                try:
                    next_ids[i] = _sample(batch.logits[i], row.temperature, row.top_p, row.generator)
                except RuntimeError as exc:  # e.g. NaN probabilities: only this request fails
                    self._fail_job(row.job, exc)
                    broken.add(row.job)
        chosen = logprobs.gather(1, next_ids[:, None])[:, 0].tolist()
        top_k = max(r.top_k for r in rows)
        tops: list[list[tuple[int, float]]] = [[] for _ in rows]
        if top_k > 0:
            values, indices = logprobs.topk(top_k, dim=-1)
            tops = [list(zip(i, v, strict=True)) for i, v in zip(indices.tolist(), values.tolist(), strict=True)]
        ids = next_ids.tolist()
        by_job: dict[_Job, list[_Event]] = {}
        for i, row in enumerate(rows):
            if row.job.dead:
                continue
            update = row.accept(ids[i], chosen[i], tuple(tops[i][: row.top_k]), self)
            self.stats.tokens_generated += 1
            if update is not None:
                by_job.setdefault(row.job, []).append(update)
        for job, events in by_job.items():
            job.deliver(events)
        keep = [i for i, r in enumerate(rows) if r.finish_reason is None and not r.job.dead]
        self.stats.cancelled_rows += sum(
            1 for r in rows if r.finish_reason is None and r.job.dead and r.job not in broken
        )
        if not keep:
            self.batch = None
            return
        if len(keep) < len(rows):
            self._select(keep)
            batch = self.batch
            assert batch is not None
        tokens = (
            next_ids[torch.tensor(keep, dtype=torch.long, device=next_ids.device)]
            if len(keep) < len(rows)
            else next_ids
        )
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones((batch.mask.shape[0], 1))], dim=1)
        out = self.model(
            input_ids=tokens[:, None],
            attention_mask=batch.mask,
            position_ids=batch.next_pos[:, None],
            use_cache=True,
            **{self._cache_arg: batch.cache},
            **self._adapter_kwargs([r.job.adapter for r in batch.rows]),
        )
        self.stats.decode_steps += 1
        batch.cache = self._cache_of(out)
        batch.next_pos = batch.next_pos + 1
        batch.logits = out.logits[:, -1, :].float()

    def _cache_of(self, out: Any) -> Any:
        return getattr(out, self._cache_arg)

    def _select(self, keep: list[int]) -> None:
        """Keep only rows ``keep``; trim KV columns that are padding for every remaining row."""
        batch = self.batch
        assert batch is not None
        index = torch.tensor(keep, dtype=torch.long, device=batch.mask.device)
        batch.cache.batch_select_indices(index)
        batch.rows = [batch.rows[i] for i in keep]
        batch.mask = batch.mask[index]
        batch.next_pos = batch.next_pos[index]
        batch.logits = batch.logits[index]
        if self.mergeable:
            # Columns that only held a finished long prompt cost attention time for nothing.
            used = batch.mask.any(dim=0).nonzero()
            first = int(used[0, 0]) if used.numel() else 0
            if first > 0:
                batch.mask = batch.mask[:, first:]
                for layer in batch.cache.layers:
                    layer.keys = layer.keys[:, :, first:, :]
                    layer.values = layer.values[:, :, first:, :]

    def _fail_job(self, job: _Job, exc: BaseException) -> None:
        self.stats.failed_requests += 1
        job.fail(_as_backend_error(exc))

    def _fail_batch(self, exc: BaseException) -> None:
        """Fail every request in the running batch (they shared the failed forward pass)."""
        batch, self.batch = self.batch, None
        if batch is not None:
            for job in {r.job for r in batch.rows}:
                self._fail_job(job, exc)


def _as_backend_error(exc: BaseException) -> AirlockError:
    if isinstance(exc, AirlockError):
        return exc
    return BackendError(f"local model failed: {type(exc).__name__}: {exc}")


def _group(pairs: Any) -> dict[_Job, list[_Event]]:
    out: dict[_Job, list[_Event]] = {}
    for job, event in pairs:
        out.setdefault(job, []).append(event)
    return out


def _plain_dynamic_cache(cache: Any) -> bool:
    """Whether ``cache`` is made of plain full-attention dynamic layers, which can be merged."""
    from transformers.cache_utils import DynamicLayer

    layers: list[Any] = list(getattr(cache, "layers", None) or [])
    return bool(layers) and all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers)


def _eos_ids(loaded: weights.LoadedModel) -> frozenset[int]:
    """Return the token ids that end a generation (config, generation config and tokenizer)."""
    found: set[int] = set()
    sources = [
        getattr(loaded.model.config, "eos_token_id", None),
        getattr(getattr(loaded.model, "generation_config", None), "eos_token_id", None),
        loaded.tokenizer.eos_token_id,
    ]
    # Chat-tuned vocabularies also end documents with <|endoftext|>; stop there too.
    end_of_text = loaded.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    if isinstance(end_of_text, int) and end_of_text != loaded.tokenizer.unk_token_id:
        sources.append(end_of_text)
    for value in sources:
        if isinstance(value, int):
            found.add(value)
        elif isinstance(value, list | tuple):
            found.update(v for v in value if isinstance(v, int))
    return frozenset(found)


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Draw one token id from ``logits`` with temperature and nucleus (top-p) filtering."""
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        keep = (sorted_probs.cumsum(0) - sorted_probs) < top_p
        sorted_probs = sorted_probs[keep]
        pick = torch.multinomial(sorted_probs, 1, generator=generator)
        return order[keep][pick][0]
    return torch.multinomial(probs, 1, generator=generator)[0]


def _row_generator(seed: int | None, index: int, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    if seed is None:
        generator.manual_seed(secrets.randbits(63))
    else:
        # Distinct, reproducible streams per choice: choice 0 of seed s never equals choice 1.
        generator.manual_seed((seed * 1_000_003 + index) % (1 << 63))
    return generator


# ---------------------------------------------------------------- the backend


class LocalBackend(ModelBackend):
    """Serves a local transformers model (SmolLM2 by default) with dynamic batching on one worker thread."""

    kind: ClassVar[str] = "local"
    supports_logprobs: bool = True
    supports_echo: bool = True
    _adapter: str | None = None  # the LoRA adapter this backend's requests run with (see adapter_view)

    def __init__(self, config: LocalBackendConfig | None = None) -> None:
        self.config = config or LocalBackendConfig()
        self.spec = weights.resolve_model_spec(self.config.model, seed=self.config.seed)
        self.stats = BatchStats()
        self.content_hash: str | None = None
        self._loaded: weights.LoadedModel | None = None
        self._tokenizer: Any = None
        self._engine: _Engine | None = None
        self._start_lock = threading.Lock()
        self._max_context = self.config.max_context

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
                engine = _Engine(self.spec, self.config, self.stats)
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

    async def _ready(self) -> _Engine:
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
        job = _Job(asyncio.get_running_loop(), self._adapter)
        job.rows.append(
            _Row(
                job,
                0,
                prompt,
                max_new=budget,
                temperature=request.temperature,
                top_p=request.top_p,
                generator=_row_generator(request.seed, 0, device) if request.temperature > 0 else None,
                stops=['"'],
                logprobs=False,
                top_k=0,
            )
        )
        written = ""
        engine.submit(job)
        async for events in self._events(job):
            written += "".join(ev.text for ev in events if isinstance(ev, _Update))
        return dataclasses.replace(plan, forced=tools.match_function(written, plan.ordered_names))

    def _check_prompt(self, ids: list[int], what: str) -> None:
        if len(ids) > self._max_context:
            raise InvalidRequestError(
                f"{what} is {len(ids)} tokens long, more than this model's context of {self._max_context} tokens; "
                "shorten it",
                code="context_length_exceeded",
                param="messages" if what == "the conversation" else "prompt",
            )

    # -- chat

    def _chat_job(self, request: ChatCompletionRequest, plan: tools.ToolPlan) -> tuple[_Job, int]:
        prompt = self._chat_prompt(request.messages, plan)
        self._check_prompt(prompt, "the conversation")
        budget = min(request.max_new_tokens(self.config.default_max_tokens), self._max_context - len(prompt))
        job = _Job(asyncio.get_running_loop(), self._adapter)
        device = torch.device(self.config.device)
        for i in range(request.n):
            job.rows.append(
                _Row(
                    job,
                    i,
                    prompt,
                    max_new=budget,
                    temperature=request.temperature,
                    top_p=request.top_p,
                    generator=_row_generator(request.seed, i, device) if request.temperature > 0 else None,
                    stops=request.stop_list() + plan.stop_sequences(),
                    logprobs=request.logprobs,
                    top_k=request.top_logprobs or 0,
                )
            )
        return job, len(prompt)

    async def chat(self, request: ChatCompletionRequest) -> ChatCompletion:
        """Return a chat completion, batched with whatever else is running; tool calls are parsed out."""
        engine = await self._ready()
        plan = await self._choose_required_function(request, tools.plan_tools(request))
        job, prompt_tokens = self._chat_job(request, plan)
        texts = [""] * request.n
        tokens: list[list[_Tok]] = [[] for _ in range(request.n)]
        finish: list[FinishReason | None] = [None] * request.n
        completion_tokens = 0
        engine.submit(job)
        async for events in self._events(job):
            for ev in events:
                if isinstance(ev, _Update):
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
        tokens: list[_Tok],
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
        job, prompt_tokens = self._chat_job(request, tools.plan_tools(request))
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
                    if not isinstance(ev, _Update):
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

    def _chat_logprobs(self, tokens: list[_Tok], request: ChatCompletionRequest) -> ChoiceLogprobs:
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

    def _completion_job(self, request: CompletionRequest) -> tuple[_Job, int, list[str]]:
        tok = self._tok()
        job = _Job(asyncio.get_running_loop(), self._adapter)
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
                    _Row(
                        job,
                        index,
                        ids,
                        max_new=budget,
                        temperature=request.temperature,
                        top_p=request.top_p,
                        generator=_row_generator(request.seed, index, device) if request.temperature > 0 else None,
                        stops=request.stop_list(),
                        logprobs=request.logprobs is not None,
                        top_k=request.logprobs or 0,
                        prompt_logprobs=request.echo and request.logprobs is not None,
                        skip_prompt_tokens=skip,
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
                if isinstance(ev, _PromptInfo):
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
                    if isinstance(ev, _PromptInfo):
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

    def _extend_legacy(self, out: CompletionLogprobs, tokens: list[_Tok], base: int, k: int) -> None:
        table = self._table()
        for t in tokens:
            out.tokens.append(table.text(t.id))
            out.token_logprobs.append(None if t.logprob is None else _finite(t.logprob))
            out.top_logprobs.append(None if t.top is None else {table.text(i): _finite(v) for i, v in t.top[:k]})
            out.text_offset.append(base + t.offset)

    # -- plumbing

    async def _events(self, job: _Job) -> AsyncGenerator[list[_Event], None]:
        """Yield the event batches of a submitted ``job`` until every row finished; cancel on exit."""
        remaining = len(job.rows)
        try:
            while remaining:
                item = await job.queue.get()
                if isinstance(item, BaseException):
                    raise item
                remaining -= sum(1 for ev in item if isinstance(ev, _Update) and ev.finish_reason is not None)
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

    def _table(self) -> _TokenTable:
        if self._engine is None:
            raise BackendUnavailableError("the local backend is not started")
        return self._engine.table

    def _eos(self) -> frozenset[int]:
        if self._engine is None:
            raise BackendUnavailableError("the local backend is not started")
        return self._engine.eos_ids

    def _fingerprint(self) -> str | None:
        return f"local-{self.content_hash[:12]}" if self.content_hash else None


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


class _AdapterView(LocalBackend):
    """A `LocalBackend` facade whose requests run with one LoRA adapter on the parent's worker."""

    def __init__(self, parent: LocalBackend, adapter: str) -> None:
        # No LocalBackend.__init__: all state (engine, tokenizer, config) is read from the parent.
        self._parent = parent
        self._adapter = adapter

    def __getattr__(self, name: str) -> Any:
        return getattr(self._parent, name)

    async def start(self) -> None:
        """Start the parent backend (the view has no worker of its own)."""
        await self._parent.start()

    async def aclose(self) -> None:
        """Do nothing: the parent owns the worker."""

    async def _ready(self) -> _Engine:
        engine = await self._parent._ready()
        if self._adapter not in engine.adapters:  # the parent was restarted without it
            raise BackendUnavailableError(f"adapter {self._adapter!r} is not loaded")
        return engine

    async def load_adapter(self, name: str, path: Path) -> None:
        """Load an adapter into the parent backend."""
        await self._parent.load_adapter(name, path)
