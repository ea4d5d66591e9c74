"""The continuous-batching engine: one worker thread owns the model and batches every request's rows.

Design (measured on a 2-core CPU with SmolLM2-135M): one decode step costs ~29 ms for one row and
~64 ms for 16 rows, so batching concurrent requests multiplies throughput. A single worker thread
owns the model. Requests are split into rows (one per choice and prompt) and queued; the worker
admits rows between decode steps (continuous batching): newcomers are prefilled together,
left-padded, and their KV cache is merged into the running batch; finished or cancelled rows are
dropped from the batch at once. Tokens reach each request's asyncio queue through
``loop.call_soon_threadsafe``, so the event loop never blocks on the model.

Sampling is per row (temperature, top-p, a per-row ``torch.Generator`` seeded from the request
seed), so a seeded request gives the same output whether it runs alone or batched with others.
Each row may carry logits processors (``processors.py``: logit bias, presence/frequency penalties,
grammar constraints) applied to its logits before sampling. Reported log-probabilities are those of
the model's raw distribution (before processors, temperature and top-p), as vLLM does.
"""

from __future__ import annotations

import asyncio
import codecs
import concurrent.futures
import inspect
import logging
import os
import queue
import secrets
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from airlock.backends import weights
from airlock.backends.local.config import BatchStats, LocalBackendConfig
from airlock.backends.local.processors import LogitsProcessor
from airlock.backends.local.tokens import TokenTable
from airlock.backends.noise import NoiseSpec, add_weight_noise
from airlock.backends.protocol import FinishReason
from airlock.backends.watermark import WatermarkStream, draw_candidates, sample_batch
from airlock.errors import AirlockError, BackendError, BackendUnavailableError, InvalidRequestError

log = logging.getLogger(__name__)

# Prompt log-probabilities need full-vocabulary logits for every prompt position; cap the logits
# one prefill materialises (positions x vocab floats) so an echo batch cannot exhaust memory.
_ECHO_LOGITS_BUDGET = 64 * 1024 * 1024
_MIN_SHARED_PREFIX = 8
"""The fewest leading tokens that every prompt of a prefill must share to be computed once for all
(below it, the extra forward pass costs more than it saves)."""


# ---------------------------------------------------------------- worker data


@dataclass(frozen=True, slots=True)
class Tok:
    """One token with its log-probability and top alternatives."""

    id: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] | None
    offset: int = 0  # character offset of the token's text within the row's text


@dataclass(slots=True)
class Update:
    """What one row produced in one step: released text, tokens, maybe its end."""

    index: int
    text: str = ""
    tokens: list[Tok] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    completion_tokens: int = 0


@dataclass(slots=True)
class PromptInfo:
    """Prompt log-probabilities of one row (for ``echo`` with ``logprobs``)."""

    index: int
    tokens: list[Tok]


Event = Update | PromptInfo


class Job:
    """One request: its rows, and the asyncio queue its events are delivered to."""

    def __init__(self, loop: asyncio.AbstractEventLoop, adapter: str | None = None) -> None:
        self.loop = loop
        self.adapter = adapter  #: LoRA adapter the rows run with (``None``: the base model)
        self.queue: asyncio.Queue[list[Event] | BaseException] = asyncio.Queue()
        self.rows: list[Row] = []
        # Written by the event loop, read by the worker: plain attributes suffice under the GIL.
        self.cancelled = False
        self.failed = False

    @property
    def dead(self) -> bool:
        """Whether the worker should drop this job's rows."""
        return self.cancelled or self.failed

    def deliver(self, events: list[Event]) -> None:
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


class Row:
    """One generated sequence (a choice), with its sampling settings and detokenization state."""

    def __init__(
        self,
        job: Job,
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
        processors: Sequence[LogitsProcessor] = (),
        watermark: WatermarkStream | None = None,
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
        #: Steps between this row's logits and its sampler, in order (``processors.py``).
        self.processors = tuple(processors)
        #: The grant's watermark, steering sampled (temperature > 0) tokens; greedy rows carry none.
        self.watermark = watermark if temperature > 0 else None
        self.generated = 0
        self.text = ""
        self.released = 0
        self.pending: list[Tok] = []
        self.finish_reason: FinishReason | None = None
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def accept(
        self, token_id: int, logprob: float, top: tuple[tuple[int, float], ...] | None, engine: Engine
    ) -> Update | None:
        """Append one sampled token; return what can be released to the client now."""
        self.generated += 1
        if self.watermark is not None:
            self.watermark.advance(token_id)
        if token_id in engine.eos_ids:
            self._finish("stop")
        else:
            start = len(self.text)
            self.text += self._decoder.decode(engine.table.bytes[token_id])
            if self.logprobs:
                self.pending.append(Tok(token_id, logprob, top if self.top_k else None, start))
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

    def release(self) -> Update | None:
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
        return Update(
            index=self.index,
            text=text,
            tokens=tokens,
            finish_reason=self.finish_reason,
            completion_tokens=self.generated if done else 0,
        )

    def finish_empty(self) -> Update:
        """End a row that has no generation budget (``max_tokens=0`` or a full context)."""
        self.finish_reason = "length"
        return Update(index=self.index, finish_reason="length", completion_tokens=0)


@dataclass
class _Batch:
    """KV cache and per-row state of the rows currently decoding together."""

    rows: list[Row]
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


class Engine:
    """Owns the model on one thread and runs the batched prefill / decode loop.

    The thread also loads the model. On a small CPU this matters: every live thread that has run
    a parallel torch op owns an OpenMP team, and once teams outnumber the cores libgomp stops
    spin-waiting, which cost ~40% of decode speed here (32 → 19 tokens/s). Loading in an
    executor thread that then idles would leave exactly such a team behind.
    """

    model: Any
    table: TokenTable
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
        self.inbox: queue.SimpleQueue[Job | _Control | None] = queue.SimpleQueue()
        self.adapters: dict[str, Path] = {}  # loaded LoRA adapters (the model is a PeftModel once non-empty)
        self.pending: deque[Row] = deque()
        self.batch: _Batch | None = None
        self.mergeable: bool | None = None  # decided on the first prefill (plain KV layers only)
        self._cache_arg = "cache"
        self._stopping = False
        #: The worker's OpenMP team size (fixed by ``threads``, else sized per batch by `auto_threads`).
        self.intra_op_threads = config.threads or 0
        self._max_threads = config.threads or 0
        self._thread = threading.Thread(target=self._main, name="airlock-local-backend", daemon=True)

    def _load(self) -> weights.LoadedModel:
        loaded = weights.load_model(self.spec, device=self.config.device, dtype=self.config.dtype)
        if self.config.noise_sigma is not None:
            # A noise-injected variant: its own copy of the weights, noised once on this thread.
            add_weight_noise(loaded.model, NoiseSpec(sigma=float(self.config.noise_sigma), seed=self.config.noise_seed))
        self.model = loaded.model
        tokenizer = loaded.tokenizer
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        self.table = TokenTable(tokenizer, self.vocab_size)
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

    def submit(self, job: Job) -> None:
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
        # Imported on the first adapter load only: peft takes seconds to import and most backends never need it.
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
        if self.config.threads is not None:
            torch.set_num_threads(self.config.threads)  # this worker thread's OpenMP team
        else:
            self._max_threads = torch.get_num_threads()
            self.intra_op_threads = self._max_threads
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

    def _enqueue(self, job: Job | _Control | None) -> None:
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
        new: list[Row] = []
        while self.pending and busy + len(new) < cap:
            row = self.pending.popleft()
            if row.job.dead:
                self.stats.cancelled_rows += 1
            else:
                new.append(row)
        if new:
            if not busy:
                self._size_team()
            self._prefill_rows(new)
        return True

    def _size_team(self) -> None:
        """Size this thread's OpenMP team for a new batch from the host's load (unless ``threads`` fixes it).

        Only between batches, so one generation runs with one team size from its prefill to its end.
        """
        if self.config.threads is not None:
            return
        try:
            load = os.getloadavg()[0]
        except OSError:  # no load average on this platform: keep torch's default
            return
        wanted = auto_threads(self._max_threads, load, self.intra_op_threads)
        if wanted != self.intra_op_threads:
            torch.set_num_threads(wanted)
            self.intra_op_threads = wanted

    def _prefill_rows(self, rows: list[Row]) -> None:
        """Prefill ``rows`` (echo rows in bounded groups) and merge those still generating."""
        plain = [r for r in rows if not r.prompt_logprobs]
        echo = [r for r in rows if r.prompt_logprobs]
        groups: list[tuple[list[Row], bool]] = [(plain, False)] if plain else []
        current: list[Row] = []
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

    def _prefill(self, rows: list[Row], full_logits: bool) -> _Batch | None:
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
        adapters = [adapter for adapter, _prompt in unique]
        shared = 0 if full_logits else self._shared_prefix(prompts, adapters)
        if shared:
            out, mask = self._prefill_after_prefix(prompts, adapters, shared)
        else:
            ids, mask, positions = self._padded(prompts, 0)
            out = self.model(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                position_ids=positions.to(self.device),
                use_cache=bool(generating),
                logits_to_keep=0 if full_logits else 1,
                **self._adapter_kwargs(adapters),
            )
        self.stats.prefills += 1
        saved = shared * (len(prompts) - 1)
        self.stats.prefill_tokens += sum(len(p) for p in prompts) - saved
        self.stats.shared_prefix_tokens += saved
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

    def _shared_prefix(self, prompts: list[tuple[int, ...]], adapters: list[str | None]) -> int:
        """Return how many leading tokens all ``prompts`` share, when computing them once pays (else 0).

        Chat prompts open with the same template and system prompt, and evaluation prompts often
        with the same few-shot examples. Only for a plain KV cache (it is copied per row) and one
        adapter (the same tokens under two adapters differ); every row keeps at least its last
        token, whose logits are its first.
        """
        if len(prompts) < 2 or not self.mergeable or len(set(adapters)) > 1:
            return 0
        shared = 0
        for column in zip(*prompts, strict=False):
            if any(token != column[0] for token in column):
                break
            shared += 1
        shared = min(shared, min(len(p) for p in prompts) - 1)
        return shared if shared >= _MIN_SHARED_PREFIX else 0

    def _prefill_after_prefix(
        self, prompts: list[tuple[int, ...]], adapters: list[str | None], shared: int
    ) -> tuple[Any, torch.Tensor]:
        """Run the ``shared`` leading tokens once, then each prompt's own tokens on a copy of their cache.

        Returns the second pass's output and the batch's attention mask. Each row's padding sits
        between the shared tokens and its own, hidden by the mask; positions count only unmasked
        tokens, so every row attends to exactly its own prompt, as if prefilled alone.
        """
        prefix = self.model(
            input_ids=torch.tensor([prompts[0][:shared]], dtype=torch.long, device=self.device),
            use_cache=True,
            logits_to_keep=1,
            **self._adapter_kwargs(adapters[:1]),
        )
        cache = self._cache_of(prefix)
        cache.batch_repeat_interleave(len(prompts))
        ids, mask, positions = self._padded(prompts, shared)
        out = self.model(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=positions.to(self.device),
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_arg: cache},
            **self._adapter_kwargs(adapters),
        )
        return out, mask

    def _padded(self, prompts: list[tuple[int, ...]], shared: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return the input ids, attention mask and positions of ``prompts`` after their first ``shared`` tokens.

        Each row's tokens are left-padded to the longest; the mask also covers the ``shared``
        tokens already in the cache (padding sits between them and the row's own); positions
        count only unmasked tokens (padding gets a harmless one).
        """
        own = [prompt[shared:] for prompt in prompts]
        width = max(len(tokens) for tokens in own)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), shared + width), dtype=torch.long)
        mask[:, :shared] = 1
        for u, tokens in enumerate(own):
            ids[u, width - len(tokens) :] = torch.tensor(tokens, dtype=torch.long)
            mask[u, shared + width - len(tokens) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]
        return ids, mask, positions

    def _send_prompt_logprobs(
        self, rows: list[Row], which: list[int], prompts: list[tuple[int, ...]], logits: torch.Tensor
    ) -> None:
        width = logits.shape[1]
        per_prompt: dict[tuple[int, int], list[Tok]] = {}
        by_job: dict[Job, list[Event]] = {}
        for row, u in zip(rows, which, strict=True):
            key = (u, row.top_k)
            if key not in per_prompt:
                prompt = prompts[u]
                offsets = self.table.offsets(prompt)
                toks = [Tok(prompt[0], None, None, offsets[0])]
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
                        Tok(tid, c, t, off)
                        for tid, c, t, off in zip(prompt[1:], chosen, tops, offsets[1:], strict=True)
                    ]
                per_prompt[key] = toks
            toks = per_prompt[key][row.skip_prompt_tokens :]
            by_job.setdefault(row.job, []).append(PromptInfo(row.index, toks))
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
        broken: set[Job] = set()
        scores = self._processed_logits(batch, broken)
        next_ids = scores.argmax(dim=-1)
        # Rows the watermark's tournament picks for: (row, candidates, grant key, window).
        marked: list[tuple[int, torch.Tensor, bytes, tuple[int, ...]]] = []
        for i, row in enumerate(rows):
            if row.temperature > 0 and not row.job.dead:
                try:
                    window = row.watermark.next_window() if row.watermark is not None else None
                    if row.watermark is None or window is None:
                        next_ids[i] = _sample(scores[i], row.temperature, row.top_p, row.generator)
                    else:
                        # The watermark is the last sampling step: its candidates come from the final
                        # distribution (after every logits step, temperature and top-p).
                        probs = _nucleus(torch.softmax(scores[i] / row.temperature, dim=-1), row.top_p)
                        marked.append((i, draw_candidates(probs, row.generator), row.watermark.key, window))
                except RuntimeError as exc:  # e.g. NaN probabilities: only this request fails
                    self._fail_job(row.job, exc)
                    broken.add(row.job)
        if marked:
            # One tournament over every watermarked row of the batch.
            winners = sample_batch(
                torch.stack([m[1] for m in marked]), [(m[2], m[3]) for m in marked], scores.shape[-1]
            )
            next_ids[[m[0] for m in marked]] = winners.to(next_ids.device, next_ids.dtype)
        chosen = logprobs.gather(1, next_ids[:, None])[:, 0].tolist()
        top_k = max(r.top_k for r in rows)
        tops: list[list[tuple[int, float]]] = [[] for _ in rows]
        if top_k > 0:
            values, indices = logprobs.topk(top_k, dim=-1)
            tops = [list(zip(i, v, strict=True)) for i, v in zip(indices.tolist(), values.tolist(), strict=True)]
        ids = next_ids.tolist()
        by_job: dict[Job, list[Event]] = {}
        for i, row in enumerate(rows):
            if row.job.dead:
                continue
            try:
                for processor in row.processors:
                    processor.accept(ids[i])
            except Exception as exc:  # a processor's own failure ends only its request
                self._fail_job(row.job, exc)
                broken.add(row.job)
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

    def _processed_logits(self, batch: _Batch, broken: set[Job]) -> torch.Tensor:
        """Return the logits the sampler draws from: each row's through its processors (raw logits are kept)."""
        if not any(row.processors for row in batch.rows):
            return batch.logits
        scores = batch.logits.clone()
        for i, row in enumerate(batch.rows):
            if not row.processors or row.job.dead:
                continue
            try:
                for processor in row.processors:
                    scores[i] = processor.process(scores[i])
            except Exception as exc:  # only this request fails
                self._fail_job(row.job, exc)
                broken.add(row.job)
        return scores

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

    def _fail_job(self, job: Job, exc: BaseException) -> None:
        self.stats.failed_requests += 1
        job.fail(_as_backend_error(exc))

    def _fail_batch(self, exc: BaseException) -> None:
        """Fail every request in the running batch (they shared the failed forward pass)."""
        batch, self.batch = self.batch, None
        if batch is not None:
            for job in {r.job for r in batch.rows}:
                self._fail_job(job, exc)


def auto_threads(cores: int, load: float, own: int) -> int:
    """Return the OpenMP team size for a step on ``cores`` cores at 1-minute load average ``load``.

    ``own`` is the current team size, counted in ``load`` while it runs. A team waits at every
    barrier for its slowest thread, so on a host whose other work leaves less than a core per
    thread, each step stalls on descheduled threads and burns the rest spinning: measured through
    HTTP at load 8-11 on 2 cores, one stream got 1.7-2.8 tokens/s from two threads spending 0.55-0.9
    core, and 1.8 from one thread spending 0.14 core. The team gets the cores the rest of the
    host leaves free (rounded), at least one.
    """
    others = max(0.0, load - own)
    return max(1, min(cores, int(cores - others + 0.5)))


def _as_backend_error(exc: BaseException) -> AirlockError:
    if isinstance(exc, AirlockError):
        return exc
    return BackendError(f"local model failed: {type(exc).__name__}: {exc}")


def _group(pairs: Any) -> dict[Job, list[Event]]:
    out: dict[Job, list[Event]] = {}
    for job, event in pairs:
        out.setdefault(job, []).append(event)
    return out


def _plain_dynamic_cache(cache: Any) -> bool:
    """Whether ``cache`` is made of plain full-attention dynamic layers, which can be merged."""
    # Imported once a model has run: `weights` imports transformers first (offline), and the
    # backend's own import stays free of it (a second or more of import time).
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


def _sample(
    logits: torch.Tensor,
    temperature: float,
    top_p: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Draw one token id from ``logits`` with temperature and nucleus (top-p) filtering (no watermark)."""
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        keep = (sorted_probs.cumsum(0) - sorted_probs) < top_p
        sorted_probs = sorted_probs[keep]
        pick = torch.multinomial(sorted_probs, 1, generator=generator)
        return order[keep][pick][0]
    return torch.multinomial(probs, 1, generator=generator)[0]


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Return ``probs`` with the tokens outside the top-``top_p`` nucleus set to zero (renormalised)."""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(descending=True)
    keep = (sorted_probs.cumsum(0) - sorted_probs) < top_p
    kept = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    return kept / kept.sum()


def row_generator(seed: int | None, index: int, device: torch.device) -> torch.Generator:
    """Return the sampling generator of choice ``index``: seeded from ``seed``, or at random without one."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.manual_seed(secrets.randbits(63))
    else:
        # Distinct, reproducible streams per choice: choice 0 of seed s never equals choice 1.
        generator.manual_seed((seed * 1_000_003 + index) % (1 << 63))
    return generator
