"""The trusted side of an interp job: model work for the RPC, the output policy, and one sandboxed run.

The host holds the weights; the evaluator's code runs in a fresh bubblewrap runner whose only
channel back is one socket. Over it the host answers an allow-listed RPC (``modules``,
``trace``, ``generate``) by running forward passes with forward hooks that read or patch
module outputs; no verb returns a parameter or a gradient. Patches never touch a module whose
output feeds the unembedding (``model.norm``), and ``set``/``add`` patches are bounded, per
position, by the norm of the activation they edit, so the evaluator cannot choose the
unembedding's input. The runner's result then passes the output policy (size caps per job and
per grant, a check that no returned tensor equals a slice of the weights, review of large
results) before anything is stored.

Full-vocabulary logits still let a determined evaluator estimate the unembedding up to a linear
transform from ordinary traces (Carlini et al. 2024, "Stealing part of a production language
model"); these defences limit how cheaply and how much, not whether: see docs/interp.md.

Model work runs on the thread that owns the model (the local backend's worker, see
docs/architecture.md "one torch thread per kind of work"); the RPC server is a plain thread
blocking on the socket, so a slow forward pass never blocks an event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import inspect
import io
import json
import logging
import math
import re
import signal
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from airlock.errors import AirlockError
from airlock.interp import _runtime, _wire, client, deadline
from airlock.interp.runner import EXIT_OK, EXIT_PROTOCOL_ERROR, EXIT_USER_ERROR, FD_ENV
from airlock.sandbox import (
    DENY_SYSCALLS,
    BwrapSandbox,
    Mount,
    ResourceLimits,
    SandboxPolicy,
    SandboxResult,
    Termination,
)

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

Array = np.ndarray[Any, Any]
MiB = 1024 * 1024
RPC_VERBS = frozenset({"modules", "trace", "generate"})
# Malformed frames answered before the conversation is ended (each one already fails the job).
MAX_PROTOCOL_ERRORS = 8
_RUNNER_VERBS = frozenset({"job", "result", "error"})
MAX_PROMPTS = 64
MAX_PROMPT_TOKENS = 1024
MAX_NEW_TOKENS = 256
MAX_TOP_K = 64
# Set by the host only (stripped from what the runner sends): the variant's system prompt, which
# chat-formatted prompts get, so that a variant's prompt-level mitigation is part of what is studied.
SYSTEM_KEY = "_variant_system_prompt"
HIDDEN_TOKEN = "<system>"
DEFAULT_PATCH_NORM_RATIO = 8.0
# Modules whose output reaches the unembedding through linear maps only: a patch there would let
# the evaluator choose the unembedding's input (one-hot rows give its columns), so none is allowed.
UNPATCHABLE = frozenset({"model.norm"})


class InterpJobError(AirlockError):
    """An interp job ended without a result it may release; ``code`` names why."""

    status_code = 422
    error_type = "interp_job_error"


# ---------------------------------------------------------------------------------- model work


class ModelWorker(Protocol):
    """Runs ``fn(model, tokenizer)`` on the thread that owns the model."""

    def submit(self, fn: Callable[[Any, Any], Any]) -> concurrent.futures.Future[Any]:
        """Schedule ``fn`` and return a future for its result."""
        ...


class BackendWorker:
    """A :class:`ModelWorker` over a started :class:`~airlock.backends.local.LocalBackend`.

    Requests run between the backend's batching steps on its own worker thread, so interp
    jobs share the loaded weights with serving and never run torch on a second thread.
    """

    def __init__(self, backend: Any) -> None:
        self._backend = backend

    def submit(self, fn: Callable[[Any, Any], Any]) -> concurrent.futures.Future[Any]:
        """Run ``fn(model, tokenizer)`` on the backend's worker between two batching steps."""
        from airlock.errors import BackendUnavailableError

        try:
            future: concurrent.futures.Future[Any] = self._backend.run_with_model(fn)
        except BackendUnavailableError as exc:
            raise InterpJobError(
                f"the local backend is not running: {exc.message}", code="backend_unavailable"
            ) from None
        return future


class ThreadWorker:
    """A :class:`ModelWorker` owning ``model`` on one long-lived thread (benchmarks, tools, tests)."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="airlock-interp-model")

    def submit(self, fn: Callable[[Any, Any], Any]) -> concurrent.futures.Future[Any]:
        """Run ``fn(model, tokenizer)`` on the model thread under ``torch.inference_mode``."""

        def run() -> Any:
            import torch

            with torch.inference_mode():
                return fn(self.model, self.tokenizer)

        return self._pool.submit(run)

    def close(self) -> None:
        """Stop the model thread."""
        self._pool.shutdown(wait=True)


class RequestError(Exception):
    """A request the host refuses; the message goes back to the evaluator's code."""


class PatchRefused(RequestError):
    """A patch the output policy forbids; it fails the job (``code``) even if the code catches it."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


_LAYER_PATH = re.compile(r"^model\.layers\.(\d+)(?:\.(self_attn|mlp|input_layernorm|post_attention_layernorm))?$")


def _base_model(model: Any) -> Any:
    # A peft-wrapped model (after fine-tuning adapters were loaded) hides the transformers one.
    getter = getattr(model, "get_base_model", None)
    return getter() if callable(getter) else model


@contextlib.contextmanager
def _adapters_off(model: Any) -> Iterator[None]:
    # Interp runs on the variant's own weights: any LoRA adapter stays out of the forward pass.
    disable = getattr(model, "disable_adapter", None)
    if callable(disable):
        with disable():
            yield
    else:
        yield


def describe(model: Any) -> dict[str, Any]:
    """Return the public shape of ``model``: readable modules and their per-token output shapes."""
    base = _base_model(model)
    layers = getattr(getattr(base, "model", None), "layers", None)
    if layers is None or not hasattr(base.model, "norm"):
        raise RequestError("this model's architecture is not supported for interp (needs model.layers, model.norm)")
    hidden = int(base.config.hidden_size)
    entries: list[dict[str, Any]] = []
    for index in range(len(layers)):
        prefix = f"model.layers.{index}"
        entries.append({"name": prefix, "kind": "residual", "shape": [hidden]})
        for sub, kind in (
            ("input_layernorm", "norm"),
            ("self_attn", "attention"),
            ("post_attention_layernorm", "norm"),
            ("mlp", "mlp"),
        ):
            entries.append({"name": f"{prefix}.{sub}", "kind": kind, "shape": [hidden]})
    entries.append({"name": "model.norm", "kind": "norm", "shape": [hidden]})
    return {
        "n_layers": len(layers),
        "hidden_size": hidden,
        "vocab_size": int(base.get_output_embeddings().weight.shape[0]),
        "modules": entries,
    }


def _module(base: Any, path: str) -> Any:
    """Return the allow-listed module at ``path`` (never the embeddings or the unembedding)."""
    if path == "model.norm":
        return base.model.norm
    match = _LAYER_PATH.match(path)
    if match is None:
        raise RequestError(f"module {path!r} is not readable (see client.modules())")
    index = int(match.group(1))
    if index >= len(base.model.layers):
        raise RequestError(f"module {path!r} does not exist: the model has {len(base.model.layers)} layers")
    module = base.model.layers[index]
    return getattr(module, match.group(2)) if match.group(2) else module


def _encode(tokenizer: Any, prompt: str, chat: bool, system: str | None = None) -> tuple[list[int], int]:
    """Return a prompt's token ids and how many leading ones are the variant's system prompt (hidden)."""
    hidden = 0
    if chat and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": prompt})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if system:
            # The mitigation's text is the lab's (the ledger keeps it as a commitment): its tokens
            # are neither shown nor readable. Chat templates render the system turn first; if
            # this one does not, the whole prompt is treated as hidden (fail closed).
            head = tokenizer.apply_chat_template(messages[:1], tokenize=False)
            head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
            hidden = len(head_ids) if ids[: len(head_ids)] == head_ids else len(ids)
    else:
        ids = tokenizer(prompt)["input_ids"]
    if not ids:
        raise RequestError("a prompt is empty after tokenisation")
    if len(ids) > MAX_PROMPT_TOKENS:
        raise RequestError(f"a prompt has {len(ids)} tokens; at most {MAX_PROMPT_TOKENS} are allowed")
    return [int(i) for i in ids], hidden


def _prompt_list(request: Mapping[str, Any]) -> list[str]:
    prompts = request.get("prompts")
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise RequestError("prompts must be a non-empty list of strings")
    if len(prompts) > MAX_PROMPTS:
        raise RequestError(f"at most {MAX_PROMPTS} prompts per call")
    return prompts


def _resolve_positions(raw: Any, lengths: list[int], hidden: list[int]) -> list[list[int]]:
    """Per prompt, the absolute positions a request covers (negative ones count from its end).

    ``hidden[b]`` leading positions (the variant's system prompt) are never covered: all
    positions means the rest, and naming one of them is refused.
    """
    if raw is None:
        out = [list(range(k, n)) for k, n in zip(hidden, lengths, strict=True)]
        if not all(out):
            raise RequestError("a prompt has no readable tokens")
        return out
    if not isinstance(raw, list) or not raw or not all(isinstance(p, int) for p in raw):
        raise RequestError("positions must be an int, a non-empty list of ints, or None")
    out = []
    for b, (k, n) in enumerate(zip(hidden, lengths, strict=True)):
        row = []
        for p in raw:
            if not -n <= p < n:
                raise RequestError(f"position {p} is out of range for prompt {b} ({n} tokens)")
            if p % n < k:
                raise RequestError(
                    f"position {p} of prompt {b} lies in the variant's system prompt, which is not readable"
                )
            row.append(p % n)
        out.append(row)
    return out


@dataclass
class _Patch:
    path: str
    op: str
    value: torch.Tensor
    positions: list[int] | None
    max_ratio: float = DEFAULT_PATCH_NORM_RATIO


def _parse_patches(raw: Any, base: Any, hidden: int, max_ratio: float = DEFAULT_PATCH_NORM_RATIO) -> dict[str, _Patch]:
    import torch

    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise RequestError("patch must map module paths to edits")
    patches: dict[str, _Patch] = {}
    for path, spec in raw.items():
        _module(base, path)
        if path in UNPATCHABLE:
            raise PatchRefused(
                f"patching {path!r} is not allowed: its output feeds the unembedding directly "
                "(patch a decoder layer instead)",
                code="patch_not_allowed",
            )
        if not isinstance(spec, dict) or spec.get("op") not in ("set", "add", "ablate"):
            raise RequestError(f"patch for {path!r} must be client.replace(), client.add() or client.ablate()")
        value = spec.get("value")
        if not isinstance(value, np.ndarray) or value.dtype.kind != "f" or value.shape[-1:] != (hidden,):
            raise RequestError(
                f"patch for {path!r}: the value must be a float array ending in the hidden size {hidden}"
            )
        if not np.isfinite(value).all():
            raise RequestError(f"patch for {path!r}: the value has NaN or infinite entries")
        if spec["op"] != "set" and value.ndim != 1:
            raise RequestError(f"patch for {path!r}: {spec['op']} takes one vector of size {hidden}")
        positions = spec.get("positions")
        if positions is not None and (
            not isinstance(positions, list) or not all(isinstance(p, int) for p in positions)
        ):
            raise RequestError(f"patch for {path!r}: positions must be a list of ints")
        tensor = torch.from_numpy(np.array(value, dtype=np.float32))
        if spec["op"] == "ablate":
            norm = float(tensor.norm())
            if norm == 0.0:
                raise RequestError(f"patch for {path!r}: cannot ablate a zero direction")
            tensor = tensor / norm
        patches[path] = _Patch(path=path, op=str(spec["op"]), value=tensor, positions=positions, max_ratio=max_ratio)
    return patches


def _check_norm(patch: _Patch, original: torch.Tensor, edit: torch.Tensor) -> None:
    """Refuse ``edit`` rows (the set value or added vector) larger than ``max_ratio`` x the activation they edit."""
    limit = original.float().norm(dim=-1) * patch.max_ratio
    size = edit.float().norm(dim=-1).expand_as(limit)
    worst = float((size - limit * (1 + 1e-5)).max()) if size.numel() else 0.0
    if worst > 0:
        at = int((size - limit).argmax())
        ratio = float(size.reshape(-1)[at]) / max(float(limit.reshape(-1)[at]) / patch.max_ratio, 1e-30)
        raise PatchRefused(
            f"the {patch.op} patch on {patch.path!r} is {ratio:.3g} times the norm of the activation it edits; "
            f"at most {patch.max_ratio:g} is allowed",
            code="patch_too_large",
        )


def _apply(
    patch: _Patch, hidden: torch.Tensor, lengths: list[int] | None, prefill: bool, hidden_prefix: list[int] | None
) -> None:
    """Edit ``hidden`` ``[batch, tokens, dim]`` in place as ``patch`` says.

    During the prompt's pass (``prefill``) the ``hidden_prefix[b]`` leading positions (the
    variant's system prompt) are never edited: a patch without positions covers the rest, and
    naming one of them is refused. Every edit is bounded by the activation it replaces.
    """
    value = patch.value.to(hidden.dtype)
    rows: list[tuple[int, Any]] = []
    for b in range(hidden.shape[0]):
        n = lengths[b] if lengths else hidden.shape[1]
        k = hidden_prefix[b] if hidden_prefix and prefill else 0
        if patch.positions is None:
            rows.append((b, slice(k, n) if prefill else slice(None)))
            continue
        if not prefill:
            return  # positions name prompt tokens; generated tokens are left alone
        bad = [p for p in patch.positions if not -n <= p < n]
        if bad:
            raise RequestError(f"patch position {bad[0]} is out of range for prompt {b} ({n} tokens)")
        inside = [p for p in patch.positions if p % n < k]
        if inside:
            raise RequestError(
                f"patch position {inside[0]} of prompt {b} lies in the variant's system prompt, which cannot be patched"
            )
        rows.append((b, [p % n for p in patch.positions]))
    for b, idx in rows:
        part = hidden[b, idx]
        if patch.op == "add":
            _check_norm(patch, part, value)
            hidden[b, idx] = part + value
        elif patch.op == "ablate":
            # Projection removal never increases the norm: no bound needed.
            hidden[b, idx] = part - (part @ value).unsqueeze(-1) * value
        else:
            v = value
            if v.ndim == 3:
                if v.shape[0] != hidden.shape[0]:
                    raise RequestError(f"a replacement of shape {tuple(v.shape)} does not match the batch")
                v = v[b]
            try:
                new = v.expand_as(part) if v.ndim == 1 else v.reshape(part.shape)
            except RuntimeError:
                raise RequestError(
                    f"a replacement of shape {tuple(patch.value.shape)} does not fit {tuple(part.shape)}"
                ) from None
            _check_norm(patch, part, new)
            hidden[b, idx] = new


@contextlib.contextmanager
def _hooks(
    base: Any,
    reads: list[str],
    patches: dict[str, _Patch],
    captured: dict[str, torch.Tensor],
    lengths: list[int] | None,
    prompt_len: int | None = None,
    hidden_prefix: list[int] | None = None,
    select: list[list[int]] | None = None,
) -> Iterator[None]:
    """Install forward hooks: capture ``reads`` (whole, or at ``select``'s positions per prompt), apply ``patches``."""
    handles = []

    def make(path: str) -> Callable[[Any, Any, Any], Any]:
        def hook(_module: Any, _inputs: Any, output: Any) -> Any:
            hidden = output[0] if isinstance(output, tuple) else output
            patch = patches.get(path)
            if patch is not None:
                prefill = prompt_len is None or hidden.shape[1] == prompt_len
                hidden = hidden.clone()
                _apply(patch, hidden, lengths, prefill, hidden_prefix)
            if path in reads:
                # Keeping only the positions asked for bounds the host's memory by the reply, not the batch.
                captured[path] = (_select(hidden, select) if select is not None else hidden).detach()
            if patch is not None:
                return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
            return None

        return hook

    try:
        for path in dict.fromkeys([*reads, *patches]):
            handles.append(_module(base, path).register_forward_hook(make(path)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _gather(tensor: torch.Tensor, positions: list[list[int]]) -> Array:
    """Return ``tensor[b, positions[b]]`` stacked to ``[batch, max positions, ...]`` (zero-padded)."""
    width = max(len(p) for p in positions)
    out = np.zeros((tensor.shape[0], width, *tensor.shape[2:]), dtype=np.float32)
    for b, pos in enumerate(positions):
        out[b, : len(pos)] = tensor[b, pos].float().cpu().numpy()
    return out


def _select(tensor: torch.Tensor, positions: list[list[int]]) -> torch.Tensor:
    """Return ``tensor[b, positions[b]]`` as ``[batch, max positions, ...]`` (rows padded by repetition)."""
    import torch

    width = max(len(p) for p in positions)
    index = torch.tensor([p + [p[-1]] * (width - len(p)) for p in positions], dtype=torch.long, device=tensor.device)
    return tensor.gather(1, index.unsqueeze(-1).expand(-1, -1, tensor.shape[-1]))


def _compact(positions: list[list[int]]) -> list[list[int]]:
    """Positions of a :func:`_select`-ed tensor: each row's first ``len(positions[b])`` entries."""
    return [list(range(len(p))) for p in positions]


# ---------------------------------------------------------------------------------- what a call may cost

DEFAULT_TOP_K = 5
MAX_TOKEN_IDS = 256
DEFAULT_MAX_REPLY_BYTES = 256 * MiB
DEFAULT_MAX_HOST_BYTES = 1024 * MiB
# The unembedding runs over at most this many bytes of logits at a time (top-k, lens, full logits).
_LOGIT_CHUNK_BYTES = 32 * MiB
# Allocator slack, tokenizer output, index tensors and the like, per call.
_HOST_OVERHEAD_BYTES = 32 * MiB
# Header bytes per array beyond its key: the reference {"__nd__":N} and the spec {"dtype":..,"shape":[..]}.
_ARRAY_HEADER_BYTES = 96
_REPLY_HEADER_SLACK = 512
LOGITS_MODES = ("none", "top_k", "full")


@dataclass(frozen=True)
class Estimate:
    """An upper bound of what one call costs, from the request's shapes, before any forward pass."""

    reply_bytes: int
    """Size of the reply frame on the wire."""
    served_bytes: int
    """Model-derived payload it serves (numeric arrays, predicted token texts, generated texts)."""
    host_bytes: int
    """Peak host memory of the call (forward pass of the largest micro-batch, outputs, encoding)."""
    batches: tuple[tuple[int, int], ...] = ()
    """``trace``: the micro-batches ``[start, end)`` of prompts the forward pass runs in."""


@dataclass
class ServeBudget:
    """What the host may serve one job: the logits it may return, per-call caps, the grant's serving budget.

    ``served_left`` is what remained of the grant's budget on payload served into the sandbox
    when the job started (None: no budget); ``served`` counts this job's payload, call by call.
    A call whose estimate does not fit is refused before the model runs.
    """

    full_logits: bool = False
    max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES
    max_host_bytes: int = DEFAULT_MAX_HOST_BYTES
    served_left: int | None = None
    served_budget: int | None = None
    """The grant's whole serving budget (for messages)."""
    served: int = 0

    def left(self) -> int | None:
        """Return the payload bytes this job may still be served (None: unlimited)."""
        return None if self.served_left is None else max(self.served_left - self.served, 0)

    def admit(self, estimate: Estimate, verb: str, hint: str) -> None:
        """Refuse (:class:`RequestError`) a call whose estimated reply, memory or payload is over a cap."""
        if estimate.reply_bytes > self.max_reply_bytes:
            raise RequestError(
                f"this {verb} would reply with up to {estimate.reply_bytes} bytes; the cap is {self.max_reply_bytes} "
                f"bytes per call ({hint})"
            )
        if estimate.host_bytes > self.max_host_bytes:
            raise RequestError(
                f"this {verb} would need about {estimate.host_bytes // MiB} MiB of host memory; the cap is "
                f"{self.max_host_bytes // MiB} MiB per call ({hint})"
            )
        left = self.left()
        if left is not None and estimate.served_bytes > left:
            total = f" of {self.served_budget}" if self.served_budget is not None else ""
            raise RequestError(
                f"this {verb} would serve up to {estimate.served_bytes} bytes of activations, logits and text, but "
                f"only {left}{total} bytes of the grant's interp serving budget are left (the lab can raise "
                "quota_interp_served_bytes)"
            )

    def charge(self, nbytes: int) -> None:
        """Count ``nbytes`` of payload served to the job."""
        self.served += int(nbytes)


@dataclass(frozen=True)
class _Dims:
    """The sizes of a decoder-only transformer that its forward pass's memory depends on."""

    hidden: int
    intermediate: int
    heads: int
    kv_dim: int
    layers: int
    vocab: int
    itemsize: int


def _dims(base: Any) -> _Dims:
    config = base.config
    hidden = int(config.hidden_size)
    heads = int(getattr(config, "num_attention_heads", 1) or 1)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    return _Dims(
        hidden=hidden,
        intermediate=int(getattr(config, "intermediate_size", None) or 4 * hidden),
        heads=heads,
        kv_dim=kv_heads * head_dim,
        layers=len(base.model.layers),
        vocab=int(base.get_output_embeddings().weight.shape[0]),
        itemsize=max(int(next(base.parameters()).element_size()), 4),
    )


def _forward_bytes(dims: _Dims, batch: int, width: int, keys: int | None = None) -> int:
    """Upper bound of the live tensors of one forward pass over ``batch`` x ``width`` tokens.

    Per token, one decoder layer's transients (residual, norms kept in float32, q/k/v and their
    rotated copies, the attention output, the MLP's gate, up, activation and product); per
    sequence, attention scores materialised three times (scores, softmax, the masked copy) and
    a float32 mask, as the eager and math-SDPA paths do. ``keys``: the attended length (KV cache).
    """
    keys = width if keys is None else keys
    tokens = batch * width
    per_token = (10 * dims.hidden + 5 * dims.intermediate + 4 * dims.kv_dim) * dims.itemsize
    attention = 3 * batch * dims.heads * width * keys * dims.itemsize + batch * width * keys * 4
    return tokens * per_token + attention + tokens * 16


_TOKEN_TEXTS: weakref.WeakKeyDictionary[Any, tuple[list[str], int, int]] = weakref.WeakKeyDictionary()
_TOKEN_TEXTS_LOCK = threading.Lock()


def _token_texts(tokenizer: Any) -> tuple[list[str], int, int]:
    """Return every token id's text, and the longest one as wire JSON and as UTF-8 (computed once)."""
    with _TOKEN_TEXTS_LOCK:
        cached = _TOKEN_TEXTS.get(tokenizer)
        if cached is None:
            texts = [str(t) for t in tokenizer.batch_decode([[i] for i in range(len(tokenizer))])]
            longest_json = max((len(json.dumps(t)) for t in texts), default=2)
            longest_utf8 = max((len(t.encode("utf-8", "surrogatepass")) for t in texts), default=0)
            cached = (texts, longest_json, longest_utf8)
            with contextlib.suppress(TypeError):  # a tokenizer that takes no weak reference is decoded each time
                _TOKEN_TEXTS[tokenizer] = cached
    return cached


def _json_len(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":")))


def served_payload(reply: Mapping[str, Any]) -> int:
    """Return the model-derived bytes of a ``trace``/``generate`` reply: arrays, predicted and generated texts.

    The prompt's own tokens and the positions echo the request and are not counted.
    """
    total = 0
    stack: list[Any] = [value for key, value in reply.items() if key not in ("tokens", "positions", "ok")]
    while stack:
        node = stack.pop()
        if isinstance(node, np.ndarray):
            total += int(node.nbytes)
        elif isinstance(node, str):
            total += len(node.encode("utf-8", "surrogatepass"))
        elif isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list | tuple):
            stack.extend(node)
    return total


def _logits_mode(raw: Any) -> str:
    if raw is True or raw == "top_k":
        return "top_k"
    if raw is False or raw is None or raw == "none":
        return "none"
    if raw == "full":
        return "full"
    raise RequestError("logits must be True (top-k plus token_ids), False, or 'full'")


def _token_ids(raw: Any, vocab: int) -> list[int]:
    if raw is None:
        return []
    if not isinstance(raw, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in raw):
        raise RequestError("token_ids must be a list of ints")
    if len(raw) > MAX_TOKEN_IDS:
        raise RequestError(f"at most {MAX_TOKEN_IDS} token_ids per call")
    bad = [t for t in raw if not 0 <= t < vocab]
    if bad:
        raise RequestError(f"token id {bad[0]} is out of range (vocabulary of {vocab})")
    return list(raw)


@dataclass
class _TracePlan:
    """A validated ``trace`` request, tokenised, with its cost estimate."""

    encoded: list[list[int]]
    hidden: list[int]
    positions: list[list[int]]
    tokens: list[list[str]]
    read: list[str]
    lens: list[str]
    mode: str
    top_k: int
    token_ids: list[int]
    patches: dict[str, _Patch]
    dims: _Dims
    estimate: Estimate


def plan_trace(
    model: Any,
    tokenizer: Any,
    request: Mapping[str, Any],
    max_patch_ratio: float = DEFAULT_PATCH_NORM_RATIO,
    budget: ServeBudget | None = None,
) -> _TracePlan:
    """Validate and tokenise a ``trace`` request and estimate its cost from the shapes alone (no forward pass)."""
    budget = budget if budget is not None else ServeBudget()
    base = _base_model(model)
    info = describe(model)
    prompts = _prompt_list(request)
    chat = bool(request.get("chat"))
    read = request.get("read") or []
    lens = request.get("lens") or []
    if not isinstance(read, list) or not all(isinstance(r, str) for r in read):
        raise RequestError("read must be a list of module paths")
    if not isinstance(lens, list) or not all(isinstance(r, str) for r in lens):
        raise RequestError("lens must be a list of module paths")
    for path in [*read, *lens]:
        _module(base, path)
    read, lens = list(dict.fromkeys(read)), list(dict.fromkeys(lens))
    top_k = request.get("top_k", DEFAULT_TOP_K)
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= MAX_TOP_K:
        raise RequestError(f"top_k must be between 1 and {MAX_TOP_K}")
    mode = _logits_mode(request.get("logits", True))
    if mode == "full" and not budget.full_logits:
        raise RequestError(
            "full-vocabulary logits need a grant that allows them (interp_full_logits); ask for top_k and "
            "token_ids instead"
        )
    dims = _dims(base)
    token_ids = _token_ids(request.get("token_ids"), dims.vocab)
    patches = _parse_patches(request.get("patch"), base, info["hidden_size"], max_patch_ratio)
    pairs = [_encode(tokenizer, p, chat, request.get(SYSTEM_KEY)) for p in prompts]
    encoded = [ids for ids, _hidden in pairs]
    hidden = [count for _ids, count in pairs]
    lengths = [len(ids) for ids in encoded]
    positions = _resolve_positions(request.get("positions"), lengths, hidden)
    for path, patch in patches.items():
        if patch.op == "set" and patch.value.ndim == 3 and patch.value.shape[0] != len(prompts):
            raise RequestError(
                f"the replacement for {path!r} of shape {tuple(patch.value.shape)} does not match the batch of "
                f"{len(prompts)} prompts"
            )
    tokens = []
    for row, k in zip(encoded, hidden, strict=True):
        texts = [str(t) for t in tokenizer.batch_decode([[t] for t in row[k:]])]
        tokens.append([HIDDEN_TOKEN] * k + texts)
    plan = _TracePlan(
        encoded=encoded,
        hidden=hidden,
        positions=positions,
        tokens=tokens,
        read=read,
        lens=lens,
        mode=mode,
        top_k=top_k,
        token_ids=token_ids,
        patches=patches,
        dims=dims,
        estimate=Estimate(0, 0, 0),
    )
    plan.estimate = _estimate_trace(plan, tokenizer, budget.max_host_bytes)
    return plan


def _estimate_trace(plan: _TracePlan, tokenizer: Any, max_host_bytes: int) -> Estimate:
    """Bound a planned trace's reply, payload and host memory, and split it into micro-batches that fit."""
    dims = plan.dims
    batch, width = len(plan.encoded), max(len(p) for p in plan.positions)
    cells = batch * width
    arrays: list[tuple[str, int]] = [(path, cells * dims.hidden * 4) for path in plan.read]
    if plan.mode == "full":
        arrays.append(("logits", cells * dims.vocab * 4))
    if plan.mode != "none":
        k, n = plan.top_k, len(plan.token_ids)
        arrays += [("top_logits", cells * k * 8), ("top_logits", cells * k * 4)]
        arrays += [("token_logits", n * 8), ("token_logits", cells * n * 4), ("logsumexp", cells * 4)]
    lens_text = lens_utf8 = 0
    if plan.lens:
        _texts, longest_json, longest_utf8 = _token_texts(tokenizer)
        for path in plan.lens:
            arrays += [(path, cells * plan.top_k * 8), (path, cells * plan.top_k * 4)]
            lens_text += cells * plan.top_k * (longest_json + 1) + cells * 2 + batch * 2 + 32
            lens_utf8 += cells * plan.top_k * longest_utf8
    array_bytes = sum(nbytes for _key, nbytes in arrays)
    header = (
        _REPLY_HEADER_SLACK
        + _json_len(plan.tokens)
        + _json_len(plan.positions)
        + sum(_ARRAY_HEADER_BYTES + _json_len(key) for key, _nbytes in arrays)
        + lens_text
    )
    reply = _wire_prefix_bytes() + header + array_bytes
    logit_work = 0
    if plan.mode != "none" or plan.lens:
        rows = _chunk_rows(dims.vocab)
        # One chunk of logits in float32, its log-softmax (or top-k copy) and the selected states.
        logit_work = 3 * rows * dims.vocab * 4 + rows * dims.hidden * dims.itemsize * 2
    # The outputs, the wire's copies of their bytes (each array's bytes, the joined body, the frame),
    # the captured states of one micro-batch (at most the outputs' size) and the header text.
    fixed = 5 * array_bytes + 2 * header + logit_work + _HOST_OVERHEAD_BYTES
    batches: list[tuple[int, int]] = []
    peak = 0
    start = 0
    lengths = [len(ids) for ids in plan.encoded]
    for end in range(1, batch + 1):
        grown = _forward_bytes(dims, end - start, max(lengths[start:end]))
        if end - start > 1 and fixed + grown > max_host_bytes:
            batches.append((start, end - 1))
            peak = max(peak, _forward_bytes(dims, end - 1 - start, max(lengths[start : end - 1])))
            start = end - 1
    batches.append((start, batch))
    peak = max(peak, _forward_bytes(dims, batch - start, max(lengths[start:batch])))
    served = array_bytes + lens_utf8
    return Estimate(reply_bytes=reply, served_bytes=served, host_bytes=fixed + peak, batches=tuple(batches))


def _wire_prefix_bytes() -> int:
    return 16  # the frame's two big-endian lengths (_wire's ``>QQ``)


def _chunk_rows(vocab: int) -> int:
    return max(1, _LOGIT_CHUNK_BYTES // (vocab * 4))


def _slice_patches(patches: dict[str, _Patch], start: int, end: int) -> dict[str, _Patch]:
    """Return the patches of the prompts ``[start, end)``: per-prompt replacements cut to the micro-batch."""
    out = {}
    for path, patch in patches.items():
        if patch.op == "set" and patch.value.ndim == 3:
            patch = dataclasses.replace(patch, value=patch.value[start:end])
        out[path] = patch
    return out


def _valid_cells(positions: list[list[int]]) -> tuple[list[int], list[int]]:
    """Rows and columns of a :func:`_select`-ed tensor that hold a requested position (not padding)."""
    rows = [b for b, p in enumerate(positions) for _ in p]
    cols = [j for p in positions for j in range(len(p))]
    return rows, cols


def run_trace(
    model: Any,
    tokenizer: Any,
    request: Mapping[str, Any],
    max_patch_ratio: float = DEFAULT_PATCH_NORM_RATIO,
    budget: ServeBudget | None = None,
) -> dict[str, Any]:
    """Answer ``trace`` (on the model's thread): estimate and admit it, then run reads, patches and read-outs.

    Logits come back as the top ``top_k`` per position, the logits of the requested
    ``token_ids`` and each position's log-sum-exp (log-probabilities without the vocabulary);
    the whole vocabulary's logits too only for ``logits="full"`` where the budget allows them.
    """
    budget = budget if budget is not None else ServeBudget()
    plan = plan_trace(model, tokenizer, request, max_patch_ratio, budget)
    budget.admit(plan.estimate, "trace", "ask for fewer prompts, positions, modules or logits per call")
    reply = _execute_trace(model, tokenizer, plan)
    budget.charge(served_payload(reply))
    return reply


def _execute_trace(model: Any, tokenizer: Any, plan: _TracePlan) -> dict[str, Any]:
    """Run a planned trace micro-batch by micro-batch, filling the reply's arrays in place."""
    import torch

    base = _base_model(model)
    dims = plan.dims
    batch, width = len(plan.encoded), max(len(p) for p in plan.positions)
    k, ids_wanted = plan.top_k, plan.token_ids
    activations = {path: np.zeros((batch, width, dims.hidden), dtype=np.float32) for path in plan.read}
    full = np.zeros((batch, width, dims.vocab), dtype=np.float32) if plan.mode == "full" else None
    cells = (batch, width) if plan.mode != "none" else (0, 0)
    top_ids = np.zeros((*cells, k), dtype=np.int64)
    top_values = np.zeros((*cells, k), dtype=np.float32)
    token_values = np.zeros((*cells, len(ids_wanted)), dtype=np.float32)
    logsumexp = np.zeros(cells, dtype=np.float32)
    lens_ids = {path: np.zeros((batch, width, k), dtype=np.int64) for path in plan.lens}
    lens_logprobs = {path: np.zeros((batch, width, k), dtype=np.float32) for path in plan.lens}
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    device = next(base.parameters()).device
    head = base.get_output_embeddings()
    wanted = torch.tensor(ids_wanted, dtype=torch.long, device=device)
    reads = list(dict.fromkeys([*plan.read, *plan.lens]))
    chunk = _chunk_rows(dims.vocab)
    for start, end in plan.estimate.batches:
        encoded = plan.encoded[start:end]
        lengths = [len(ids) for ids in encoded]
        selected = plan.positions[start:end]
        # Right padding with a mask: each prompt's own positions keep their indices.
        ids = torch.full((len(encoded), max(lengths)), pad, dtype=torch.long)
        mask = torch.zeros((len(encoded), max(lengths)), dtype=torch.long)
        for b, row in enumerate(encoded):
            ids[b, : len(row)] = torch.tensor(row)
            mask[b, : len(row)] = 1
        captured: dict[str, torch.Tensor] = {}
        patches = _slice_patches(plan.patches, start, end)
        hooks = _hooks(base, reads, patches, captured, lengths, hidden_prefix=plan.hidden[start:end], select=selected)
        with _adapters_off(model), hooks:
            # The decoder alone: the unembedding runs only on the positions asked for.
            out = base.model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
        rows, cols = _valid_cells(selected)
        index_rows = torch.tensor(rows, dtype=torch.long, device=device)
        index_cols = torch.tensor(cols, dtype=torch.long, device=device)
        out_rows = np.asarray(rows, dtype=np.int64) + start
        out_cols = np.asarray(cols, dtype=np.int64)
        for path in plan.read:
            activations[path][out_rows, out_cols] = captured[path][index_rows, index_cols].float().cpu().numpy()
        final = _select(out.last_hidden_state, selected)[index_rows, index_cols] if plan.mode != "none" else None
        del out
        for lo in range(0, len(rows), chunk):
            at = (out_rows[lo : lo + chunk], out_cols[lo : lo + chunk])
            if final is not None:
                logits = head(final[lo : lo + chunk]).float()
                if full is not None:
                    full[at] = logits.cpu().numpy()
                values, indices = logits.topk(k, dim=-1)
                top_ids[at], top_values[at] = indices.cpu().numpy(), values.cpu().numpy()
                logsumexp[at] = torch.logsumexp(logits, dim=-1).cpu().numpy()
                if ids_wanted:
                    token_values[at] = logits[:, wanted].cpu().numpy()
                del logits
            for path in plan.lens:
                states = captured[path][index_rows[lo : lo + chunk], index_cols[lo : lo + chunk]]
                normed = states if path == "model.norm" else base.model.norm(states)
                values, indices = torch.log_softmax(head(normed).float(), dim=-1).topk(k, dim=-1)
                lens_ids[path][at], lens_logprobs[path][at] = indices.cpu().numpy(), values.cpu().numpy()
        captured.clear()
    reply: dict[str, Any] = {"tokens": plan.tokens, "positions": plan.positions, "activations": activations}
    if full is not None:
        reply["logits"] = full
    if plan.mode != "none":
        reply["top_logits"] = {"ids": top_ids, "values": top_values}
        reply["token_logits"] = {"ids": np.asarray(ids_wanted, dtype=np.int64), "values": token_values}
        reply["logsumexp"] = logsumexp
    if plan.lens:
        texts = _token_texts(tokenizer)[0]
        reply["lens"] = {
            path: {
                "token_ids": lens_ids[path],
                "logprobs": lens_logprobs[path],
                "tokens": [[[texts[int(t)] for t in pos] for pos in row] for row in lens_ids[path]],
            }
            for path in plan.lens
        }
    return reply


def _generate_request(request: Mapping[str, Any]) -> tuple[int, float, float, int | None]:
    max_tokens = request.get("max_tokens", 32)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= MAX_NEW_TOKENS:
        raise RequestError(f"max_tokens must be between 1 and {MAX_NEW_TOKENS}")
    temperature = request.get("temperature", 0.0)
    top_p = request.get("top_p", 1.0)
    if not isinstance(temperature, int | float) or not 0 <= temperature <= 5:
        raise RequestError("temperature must be between 0 and 5")
    if not isinstance(top_p, int | float) or not 0 < top_p <= 1:
        raise RequestError("top_p must be in (0, 1]")
    seed = request.get("seed")
    if seed is not None and not isinstance(seed, int):
        raise RequestError("seed must be an integer")
    return max_tokens, float(temperature), float(top_p), seed


def estimate_generate(
    dims: _Dims, lengths: list[int], max_tokens: int, longest_json: int, longest_utf8: int
) -> Estimate:
    """Bound a ``generate`` call: texts of ``max_tokens`` tokens per prompt, one prompt at a time on the host."""
    texts = len(lengths) * (max_tokens * longest_json + 4)
    reply = _wire_prefix_bytes() + _REPLY_HEADER_SLACK + texts
    peak = 0
    for length in lengths:
        total = length + max_tokens
        prefill = _forward_bytes(dims, 1, length)
        step = _forward_bytes(dims, 1, 1, keys=total)
        # The KV cache at its longest (twice: a growing cache is copied as it is extended).
        cache = 2 * 2 * dims.layers * total * dims.kv_dim * dims.itemsize
        # One position's logits, probabilities, their sorted copy and order (top-p).
        sampling = dims.vocab * 4 * 6
        peak = max(peak, max(prefill, step) + cache + sampling)
    return Estimate(
        reply_bytes=reply,
        served_bytes=len(lengths) * max_tokens * longest_utf8,
        host_bytes=peak + 2 * reply + _HOST_OVERHEAD_BYTES,
    )


def run_generate(
    model: Any,
    tokenizer: Any,
    request: Mapping[str, Any],
    max_patch_ratio: float = DEFAULT_PATCH_NORM_RATIO,
    budget: ServeBudget | None = None,
) -> dict[str, Any]:
    """Answer ``generate`` (on the model's thread): sample each prompt with patches applied."""
    import torch

    budget = budget if budget is not None else ServeBudget()
    base = _base_model(model)
    info = describe(model)
    prompts = _prompt_list(request)
    max_tokens, temperature, top_p, seed = _generate_request(request)
    patches = _parse_patches(request.get("patch"), base, info["hidden_size"], max_patch_ratio)
    chat = bool(request.get("chat", True))
    encoded = [_encode(tokenizer, prompt, chat, request.get(SYSTEM_KEY)) for prompt in prompts]
    _texts, longest_json, longest_utf8 = _token_texts(tokenizer)
    estimate = estimate_generate(
        _dims(base), [len(ids) for ids, _hidden in encoded], max_tokens, longest_json, longest_utf8
    )
    budget.admit(estimate, "generate", "ask for fewer prompts or max_tokens per call")
    eos = tokenizer.eos_token_id
    # transformers 5.24 renamed the KV-cache argument ``past_key_values`` to ``cache``.
    parameters = inspect.signature(base.forward).parameters
    cache_arg = "cache" if "cache" in parameters else "past_key_values"
    # Only the last position's logits are needed: over a long prompt the whole [tokens, vocab] would dominate.
    keep = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
    texts = []
    device = next(base.parameters()).device
    for index, (ids, hidden) in enumerate(encoded):
        generator = torch.Generator(device="cpu")
        generator.manual_seed((seed if seed is not None else 0) + index)
        captured: dict[str, torch.Tensor] = {}
        sequence = list(ids)
        cache = None
        hooks = _hooks(base, [], patches, captured, [len(ids)], prompt_len=len(ids), hidden_prefix=[hidden])
        with _adapters_off(model), hooks:
            step_ids = torch.tensor([ids], device=device)
            for _ in range(max_tokens):
                out = base(
                    input_ids=step_ids, use_cache=True, **keep, **({cache_arg: cache} if cache is not None else {})
                )
                cache = getattr(out, cache_arg)
                logits = out.logits[0, -1].float()
                if temperature == 0:
                    token = int(logits.argmax())
                else:
                    probs = torch.softmax(logits / temperature, dim=-1)
                    if top_p < 1:
                        sorted_p, order = probs.sort(descending=True)
                        keep_p = sorted_p.cumsum(-1) - sorted_p < top_p
                        probs = torch.zeros_like(probs).scatter(0, order[keep_p], sorted_p[keep_p])
                    token = int(torch.multinomial(probs.cpu(), 1, generator=generator))
                if eos is not None and token == eos:
                    break
                sequence.append(token)
                step_ids = torch.tensor([[token]], device=device)
        texts.append(tokenizer.decode(sequence[len(ids) :], skip_special_tokens=True))
    reply = {"texts": texts}
    budget.charge(served_payload(reply))
    return reply


# ---------------------------------------------------------------------------------- weights check

_WINDOW = 4  # values per fingerprint
_STRIDE = 64  # fingerprints are taken every _STRIDE values along each row and column
MIN_MATCH = 32  # consecutive equal values that count as a copy of the weights
_MIX = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93], dtype=np.uint64)


def _fingerprints(bits: Array) -> Array:
    """Hash each run of ``_WINDOW`` consecutive uint32 values of the last axis (sliding)."""
    x = bits.astype(np.uint64)
    n = x.shape[-1] - _WINDOW + 1
    out = np.zeros((*x.shape[:-1], max(n, 0)), dtype=np.uint64)
    for k in range(_WINDOW):
        out ^= x[..., k : k + n] * _MIX[k]  # uint64 arithmetic wraps by design
    return out


class ParamIndex:
    """Finds copies of the weights in outgoing arrays: runs of equal float32 values along a row or column.

    Every parameter is indexed as lines (rows, and columns of matrices), with a fingerprint
    every ``_STRIDE`` values; an outgoing array is fingerprinted at every offset, and hits are
    verified value by value. Any copied run of at least ``_STRIDE + _WINDOW`` values (or a
    whole line, when shorter) is found. It does not find transformed weights (scaled, summed,
    rounded to a lower precision): the size cap and the review queue are the backstop there.
    The index holds fingerprints and views of the parameters, never copies of them.
    """

    def __init__(self, named: list[tuple[str, Array]]) -> None:
        self.params: list[tuple[str, Array]] = []
        keys: list[Array] = []
        where: list[Array] = []
        for name, values in named:
            matrix = np.asarray(values, dtype=np.float32)
            matrix = matrix.reshape(-1, matrix.shape[-1]) if matrix.ndim else matrix.reshape(1, 1)
            param_id = len(self.params)
            self.params.append((name, matrix))
            orientations = [0, 1] if np.ndim(values) == 2 else [0]
            for axis in orientations:
                length = matrix.shape[1] if axis == 0 else matrix.shape[0]
                for start in range(0, max(length - _WINDOW + 1, 0), _STRIDE):
                    # [lines, _WINDOW]: the window at ``start`` of every row (axis 0) or column (axis 1).
                    part = matrix[:, start : start + _WINDOW] if axis == 0 else matrix[start : start + _WINDOW, :].T
                    windows = np.ascontiguousarray(part)
                    # Constant windows (zeros, ones of a norm) carry no information and match anything.
                    varied = np.nonzero((windows != windows[:, :1]).any(axis=1))[0]
                    keys.append(_fingerprints(windows.view(np.uint32))[varied, 0])
                    rows = np.empty((len(varied), 4), dtype=np.int32)
                    rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3] = param_id, axis, varied, start
                    where.append(rows)
        all_keys = np.concatenate(keys) if keys else np.zeros(0, dtype=np.uint64)
        order = np.argsort(all_keys, kind="stable")
        self.keys = all_keys[order]
        self.where = (np.concatenate(where) if where else np.zeros((0, 4), dtype=np.int32))[order]

    @classmethod
    def of_model(cls, model: Any) -> ParamIndex:
        """Index every floating-point parameter of ``model`` (each tensor once, tied ones included)."""
        seen: set[int] = set()
        named = []
        for name, param in _base_model(model).named_parameters():
            if not param.dtype.is_floating_point or param.data_ptr() in seen:
                continue
            seen.add(param.data_ptr())
            named.append((name, param.detach().float().cpu().numpy()))
        return cls(named)

    def find(self, array: Array) -> str | None:
        """Return a description of a weights copy inside ``array``, or None."""
        if array.dtype.kind != "f" or array.size < _WINDOW or not len(self.keys):
            return None
        flat = np.ascontiguousarray(array, dtype=np.float32).reshape(-1)
        prints = _fingerprints(flat.view(np.uint32))
        slots = np.searchsorted(self.keys, prints)
        slots[slots == len(self.keys)] = 0
        for offset in np.nonzero(self.keys[slots] == prints)[0]:
            lo = np.searchsorted(self.keys, prints[offset], side="left")
            hi = np.searchsorted(self.keys, prints[offset], side="right")
            for param_id, axis, index, start in self.where[lo:hi]:
                name, matrix = self.params[int(param_id)]
                line = matrix[int(index)] if axis == 0 else matrix[:, int(index)]
                run = _match_length(flat, int(offset), line, int(start))
                if run >= min(MIN_MATCH, len(line)):
                    kind = "row" if axis == 0 else "column"
                    return f"{run} values equal to {kind} {int(index)} of {name}"
        return None


def _match_length(flat: Array, at: int, line: Array, start: int) -> int:
    """Length of the run of equal values through ``flat[at]`` ≡ ``line[start]``."""
    back = min(at, start)
    ahead = min(len(flat) - at, len(line) - start)
    a = flat[at - back : at + ahead].view(np.uint32)
    b = np.ascontiguousarray(line[start - back : start + ahead]).view(np.uint32)
    equal = a == b
    if not equal[back]:
        return 0
    left = back - (np.nonzero(~equal[:back])[0].max() + 1 if (~equal[:back]).any() else 0)
    after = equal[back:]
    right = int(np.argmin(after)) if not after.all() else len(after)
    return int(left + right)


_INDEXES: weakref.WeakKeyDictionary[Any, ParamIndex] = weakref.WeakKeyDictionary()
_INDEX_LOCK = threading.Lock()


def param_index(worker: ModelWorker) -> ParamIndex:
    """Return the (cached) weights index of ``worker``'s model, building it on the model thread once."""

    def build(model: Any, _tokenizer: Any) -> ParamIndex:
        base = _base_model(model)
        with _INDEX_LOCK:
            index = _INDEXES.get(base)
            if index is None:
                index = _INDEXES[base] = ParamIndex.of_model(base)
        return index

    result: ParamIndex = worker.submit(build).result()
    return result


@dataclass(frozen=True)
class ModelSize:
    """The size of the protected weights, which interp serving budgets are relative to."""

    parameters: int
    """Parameters, each tensor once (tied embeddings count once)."""
    parameter_bytes: int
    """Their bytes as loaded (parameter count x bytes per parameter)."""
    embedding_parameters: int
    """Parameters of the unembedding (vocabulary x hidden size)."""


def model_size_of(model: Any) -> ModelSize:
    """Return the size of ``model``'s weights: every parameter tensor once."""
    base = _base_model(model)
    seen: set[int] = set()
    parameters = nbytes = 0
    for param in base.parameters():
        if param.data_ptr() in seen:
            continue
        seen.add(param.data_ptr())
        parameters += int(param.numel())
        nbytes += int(param.numel()) * int(param.element_size())
    return ModelSize(
        parameters=parameters,
        parameter_bytes=nbytes,
        embedding_parameters=int(base.get_output_embeddings().weight.numel()),
    )


def model_size(worker: ModelWorker) -> ModelSize:
    """Return the size of ``worker``'s model (computed on the model thread)."""
    size: ModelSize = worker.submit(lambda model, _tokenizer: model_size_of(model)).result()
    return size


# ---------------------------------------------------------------------------------- output policy


@dataclass(frozen=True)
class OutputPolicy:
    """What a job may release: size caps and the weights check."""

    max_result_bytes: int
    """Largest result (JSON + arrays) of one job."""
    grant_bytes_left: int | None
    """What remains of the grant's result-bytes quota (None: no quota)."""
    review_over_bytes: int
    """Results larger than this wait for a lab reviewer."""


@dataclass
class Released:
    """A result that passed the output policy: its JSON document and NPZ bytes."""

    document: dict[str, Any]
    npz: bytes
    result_bytes: int
    arrays: list[dict[str, Any]]
    needs_review: bool
    review_reasons: list[str]
    sha256: str = ""
    """The digest of the whole result, JSON values and arrays (:func:`airlock.interp.client.result_sha256`)."""


def apply_policy(value: Any, policy: OutputPolicy, index: ParamIndex | None) -> Released:
    """Split a result into JSON and arrays, enforce the caps and the weights check (or raise)."""
    arrays: dict[str, Array] = {}

    def strip(node: Any, path: str, depth: int = 0) -> Any:
        if depth > _wire.MAX_DEPTH:
            raise InterpJobError(
                f"the result is nested deeper than {_wire.MAX_DEPTH} levels (at {path[:200]})", code="invalid_result"
            )
        if isinstance(node, np.ndarray):
            name = f"a{len(arrays)}"
            arrays[name] = node
            return {"__array__": name}
        if isinstance(node, dict):
            if "__array__" in node:
                # Reserved for array references: a literal one would be indistinguishable from an array.
                raise InterpJobError(f"the key '__array__' is reserved (at {path[:200]})", code="invalid_result")
            return {key: strip(item, f"{path}.{key}", depth + 1) for key, item in node.items()}
        if isinstance(node, list):
            return [strip(item, f"{path}[{i}]", depth + 1) for i, item in enumerate(node)]
        if isinstance(node, float) and not math.isfinite(node):
            return None if math.isnan(node) else ("inf" if node > 0 else "-inf")
        return node

    document = strip(value, "result")
    try:
        # One rule on both sides: the evaluator recomputes this digest from what the API returns.
        digest = client.result_sha256(document, arrays)
    except ValueError as exc:  # lone surrogates, integers past 2^53 - 1: not exactly representable JSON
        raise InterpJobError(f"the result is not exactly representable as JSON: {exc}", code="invalid_result") from None
    text = json.dumps(document, separators=(",", ":"))
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)  # type: ignore[arg-type]
    npz = buffer.getvalue()
    size = len(text.encode()) + sum(int(a.nbytes) for a in arrays.values())
    if size > policy.max_result_bytes:
        raise InterpJobError(
            f"the result is {size} bytes; the per-job cap is {policy.max_result_bytes} bytes", code="result_too_large"
        )
    if policy.grant_bytes_left is not None and size > policy.grant_bytes_left:
        raise InterpJobError(
            f"the result is {size} bytes but only {max(policy.grant_bytes_left, 0)} bytes of the grant's "
            "result quota are left",
            code="insufficient_quota",
        )
    if index is not None:
        for name, array in arrays.items():
            found = index.find(array)
            if found:
                raise InterpJobError(
                    f"the result was withheld: array {name} contains {found}", code="weights_in_result"
                )
    reasons = []
    if size > policy.review_over_bytes:
        reasons.append(f"result of {size} bytes exceeds the review threshold of {policy.review_over_bytes} bytes")
    return Released(
        document=document,
        npz=npz,
        result_bytes=size,
        arrays=[{"name": n, "dtype": a.dtype.name, "shape": list(a.shape)} for n, a in arrays.items()],
        needs_review=bool(reasons),
        review_reasons=reasons,
        sha256=digest,
    )


# ---------------------------------------------------------------------------------- RPC server


@dataclass
class RpcStats:
    """What the runner asked of the host."""

    calls: dict[str, int] = field(default_factory=dict)
    bytes_in: int = 0
    bytes_out: int = 0
    model_seconds: float = 0.0
    """Time the model thread spent on this job's calls (forward passes), counted as they run."""
    rpc_seconds: float = 0.0
    """CPU time of the RPC thread (decoding requests, encoding replies): host time too."""
    refused: list[str] = field(default_factory=list)
    protocol_errors: list[str] = field(default_factory=list)

    @property
    def host_seconds(self) -> float:
        """Return the host time this job used outside its sandbox (model and RPC threads)."""
        return self.model_seconds + self.rpc_seconds

    def as_dict(self) -> dict[str, Any]:
        """Return the stats as JSON values."""
        return {
            "calls": dict(self.calls),
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "model_seconds": round(self.model_seconds, 4),
            "rpc_seconds": round(self.rpc_seconds, 4),
            "refused": list(self.refused),
            "protocol_errors": list(self.protocol_errors),
        }


class RpcServer:
    """Answers one runner over the host end of its socketpair, on its own thread."""

    def __init__(
        self,
        sock: socket.socket,
        worker: ModelWorker,
        job: dict[str, Any],
        *,
        max_request_bytes: int = 64 * MiB,
        max_reply_bytes: int = 256 * MiB,
        max_total_bytes: int = 4096 * MiB,
        max_result_bytes: int = 64 * MiB,
        max_model_seconds: float | None = None,
        wall_deadline: float | None = None,
        system_prompt: str | None = None,
        max_patch_ratio: float = DEFAULT_PATCH_NORM_RATIO,
        serve: ServeBudget | None = None,
    ) -> None:
        self.sock = sock
        self.max_patch_ratio = max_patch_ratio
        # Logits mode, per-call estimates and the grant's serving budget (see ServeBudget).
        self.serve = serve if serve is not None else ServeBudget(max_reply_bytes=max_reply_bytes)
        self.system_prompt = system_prompt
        self.worker = worker
        self.job = job
        self.max_request_bytes = max_request_bytes
        self.max_reply_bytes = max_reply_bytes
        self.max_total_bytes = max_total_bytes
        self.max_result_bytes = max_result_bytes
        # The host's forward passes are not in the sandbox's CPU limit; this caps them per job,
        # counted as they run (see airlock.interp.deadline), together with the RPC thread's CPU.
        self.max_model_seconds = max_model_seconds
        self.wall_deadline = wall_deadline
        """``time.monotonic()`` at which the job's wall clock ends: no model call runs past it."""
        self.stats = RpcStats()
        self.result: Any = None
        self.has_result = False
        self.error: dict[str, str] | None = None
        self.protocol_error: str | None = None
        self.result_too_large: int | None = None
        self.host_time_spent: tuple[str, str] | None = None
        """Why the job's host time ran out (message, job error code)."""
        self.host_failure: str | None = None
        """An unexpected failure of the host while handling a message (answered, then the job fails)."""
        self.patch_refused: PatchRefused | None = None
        self.reply_error: tuple[str, str] | None = None
        """Why the host could not send a reply, and the job error code it becomes."""
        self._thread = threading.Thread(target=self._serve, name="airlock-interp-rpc", daemon=True)

    def start(self) -> None:
        """Start serving."""
        self._thread.start()

    def join(self, timeout: float = 30.0) -> None:
        """Wait for the runner's end of the socket to close."""
        self._thread.join(timeout)

    def _serve(self) -> None:
        cpu_at_start = time.thread_time()
        try:
            while self._serve_one():
                self.stats.rpc_seconds = time.thread_time() - cpu_at_start
                if self.max_model_seconds is not None and self.stats.rpc_seconds > self.max_model_seconds:
                    # Only a flood of frames costs this much: stop reading them.
                    self.host_time_spent = (
                        f"the job's messages took more than its host time of {self.max_model_seconds:g} s to decode",
                        "host_time_limit",
                    )
                    return
        except OSError as exc:
            if self.protocol_error is None and not self.has_result:
                self.protocol_error = f"the runner's socket failed: {exc}"
        finally:
            self.stats.rpc_seconds = time.thread_time() - cpu_at_start
            # Whatever ended the conversation, the runner must not block writing to nobody.
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)

    def _serve_one(self) -> bool:
        """Receive and answer one message; return False when the conversation is over.

        Nothing a frame holds may end this thread by an exception: a complete frame that is not
        a valid message is answered with a ``protocol_error`` reply (the stream is still in step),
        and only a frame that cannot be read whole (too large, cut short) ends the conversation.
        """
        try:
            # One cap for every frame: a result frame cannot be told apart before it is read.
            message, size = _wire.recv(self.sock, min(self.max_request_bytes, self.max_result_bytes + MiB))
        except _wire.ConnectionClosed:
            return False
        except _wire.FrameTooLarge as exc:
            if exc.op == "result":
                self.result_too_large = exc.size
                what = f"the result is {exc.size} bytes (cap {exc.cap})"
            else:
                verb = f"a {exc.op!r} message" if exc.op else "a message"
                what = f"the runner sent {verb} of {exc.size} bytes (cap {exc.cap})"
                self._protocol_violation(what)
            self._send_error("protocol_error", what + "; the conversation is over")
            return False
        except _wire.MalformedFrame as exc:
            self.stats.bytes_in += exc.size
            return self._protocol_violation(f"malformed message from the runner: {exc}", answer=True)
        except _wire.WireError as exc:  # cut short: the stream is out of step
            self._protocol_violation(f"malformed message from the runner: {exc}")
            return False
        self.stats.bytes_in += size
        try:
            return self._dispatch(message)
        except OSError:
            raise
        except _wire.WireError as exc:
            # Only the host's own replies get here (what the runner sends is checked in recv).
            self.reply_error = (f"the host could not send a reply to the runner: {exc}", "reply_error")
            return False
        except Exception as exc:  # a host bug must not take the RPC thread (and with it the job) down silently
            log.exception("interp RPC: the host failed to handle a message")
            self.host_failure = self.host_failure or f"{type(exc).__name__}: {str(exc)[:200]}"
            self._send_error("host_error", f"the host failed to handle the message ({type(exc).__name__})")
            return True

    def _dispatch(self, message: dict[str, Any]) -> bool:
        op = message.get("op")
        if not isinstance(op, str):
            self._refuse("a message without a verb")
            return True
        self.stats.calls[op[:64]] = self.stats.calls.get(op[:64], 0) + 1
        if op == "job":
            try:
                self._reply(self.job)
            except _wire.WireError as exc:
                self.reply_error = (f"the job's arguments could not be sent to the runner: {exc}", "invalid_args")
                return False
        elif op == "result":
            self.result, self.has_result = message.get("value"), True
            self._reply({"ok": True})
        elif op == "error":
            self.error = {
                "type": str(message.get("type", "Error"))[:200],
                "message": str(message.get("message", ""))[:4000],
            }
        elif op in RPC_VERBS:
            self._answer(op, message)
        else:
            self._refuse(f"the RPC verb {op[:64]!r} (allowed: {', '.join(sorted(RPC_VERBS))})")
        return True

    def _protocol_violation(self, what: str, *, answer: bool = False) -> bool:
        """Record a broken frame (it fails the job); answer it when ``answer``; return whether to go on."""
        self.protocol_error = self.protocol_error or what
        self.stats.protocol_errors.append(what[:300])
        if answer:
            self._send_error("protocol_error", what)
        # A runner that keeps sending garbage is not trying to be understood.
        return len(self.stats.protocol_errors) < MAX_PROTOCOL_ERRORS

    def _send_error(self, code: str, message: str) -> None:
        """Best-effort error reply (the runner may already be gone, or not reading)."""
        with contextlib.suppress(OSError, _wire.WireError):
            self._reply({"ok": False, "code": code, "error": message})

    def _call_deadline(self, started: float) -> deadline.Deadline:
        """Return when a model call starting at ``started`` must stop: host time left, or the wall clock."""
        at, code = math.inf, "host_time_limit"
        message = "the call ran out of time"
        if self.max_model_seconds is not None:
            at = started + self.max_model_seconds - self.stats.host_seconds
            message = (
                f"the job's host model time of {self.max_model_seconds:g} s ran out during this call "
                "(forward passes on the lab's side count as they run)"
            )
        if self.wall_deadline is not None and self.wall_deadline < at:
            at, code = self.wall_deadline, "timeout"
            message = "the job's wall-clock limit was reached during this call"
        return deadline.Deadline(at=at, message=message, code=code)

    def _refuse(self, what: str) -> None:
        self.stats.refused.append(what)
        self._reply({"ok": False, "error": f"refused {what}"})

    def _reply(self, message: dict[str, Any]) -> None:
        """Send ``message`` (a :class:`~airlock.interp._wire.WireError` if it cannot be encoded)."""
        self.stats.bytes_out += _wire.send(self.sock, message)

    def _answer(self, op: str, request: dict[str, Any]) -> None:
        if self.stats.bytes_out > self.max_total_bytes:
            self._reply(
                {"ok": False, "error": f"the job's RPC transfer budget of {self.max_total_bytes} bytes is spent"}
            )
            return
        if self.max_model_seconds is not None and self.stats.host_seconds >= self.max_model_seconds:
            spent = (f"the job's host model time of {self.max_model_seconds:g} s is spent", "host_time_limit")
            self.host_time_spent = self.host_time_spent or spent
            self._reply({"ok": False, "code": spent[1], "error": spent[0]})
            return
        request = {k: v for k, v in request.items() if k != SYSTEM_KEY}
        if self.system_prompt:
            request[SYSTEM_KEY] = self.system_prompt
        handlers: dict[str, Callable[[Any, Any], dict[str, Any]]] = {
            "modules": lambda m, t: describe(m),
            "trace": lambda m, t: run_trace(m, t, request, self.max_patch_ratio, self.serve),
            "generate": lambda m, t: run_generate(m, t, request, self.max_patch_ratio, self.serve),
        }
        handler = handlers[op]

        def timed(model: Any, tokenizer: Any) -> dict[str, Any]:
            # On the model thread: the clock starts when the call does (not while it waits for
            # serving's batching step), and the hooks live only as long as the call.
            started = time.monotonic()
            try:
                with deadline.enforced(model, self._call_deadline(started)):
                    return handler(model, tokenizer)
            finally:
                self.stats.model_seconds += time.monotonic() - started

        try:
            body = self.worker.submit(timed).result()
            reply = {"ok": True, **body}
            frame = _wire.encode(reply)
        except deadline.DeadlineExceeded as exc:
            # Like a refused patch: the job fails even if the evaluator's code catches the error.
            self.host_time_spent = self.host_time_spent or (str(exc), exc.code)
            self._reply({"ok": False, "code": exc.code, "error": str(exc)})
            return
        except PatchRefused as exc:
            # Like a forbidden verb: the job fails even if the evaluator's code catches the error.
            self.patch_refused = self.patch_refused or exc
            self._reply({"ok": False, "error": str(exc)})
            return
        except RequestError as exc:
            self._reply({"ok": False, "error": str(exc)})
            return
        except AirlockError as exc:
            self._reply({"ok": False, "error": exc.message})
            return
        except Exception as exc:  # a model failure must reach the evaluator as an error, not a hang
            log.exception("interp %s failed", op)
            self._reply({"ok": False, "error": f"the host could not run {op}: {type(exc).__name__}"})
            return
        if len(frame) > self.max_reply_bytes:
            self._reply({"ok": False, "error": f"the reply would be {len(frame)} bytes (cap {self.max_reply_bytes})"})
            return
        self.sock.sendall(frame)
        self.stats.bytes_out += len(frame)


# ---------------------------------------------------------------------------------- one run


@dataclass(frozen=True)
class JobSpec:
    """The evaluator's code and how to call it."""

    code: str
    filename: str
    entry_point: str
    args: dict[str, Any]
    system_prompt: str | None = None
    """The variant's system prompt (its ``system_prompt`` mitigations), applied to chat-formatted prompts."""


@dataclass
class RunOutcome:
    """What happened in one sandboxed run (result still raw: the policy comes after)."""

    value: Any
    logs: str
    usage: dict[str, Any]
    error: InterpJobError | None


def runner_limits(*, cpu_seconds: int, wall_seconds: float, memory_bytes: int, log_bytes: int) -> ResourceLimits:
    """Return the sandbox limits of a runner."""
    return ResourceLimits(
        wall_timeout_s=wall_seconds,
        cpu_seconds=cpu_seconds,
        memory_bytes=memory_bytes,
        max_processes=64,
        file_size_bytes=16 * MiB,
        open_files=256,
        output_bytes=log_bytes,
        tmp_bytes=64 * MiB,
        shm_bytes=16 * MiB,
    )


async def run_job(
    spec: JobSpec,
    worker: ModelWorker,
    limits: ResourceLimits,
    *,
    cancelled: Callable[[], bool] = lambda: False,
    max_result_bytes: int = 64 * MiB,
    max_patch_ratio: float = DEFAULT_PATCH_NORM_RATIO,
    serve: ServeBudget | None = None,
) -> RunOutcome:
    """Run ``spec`` in a fresh sandboxed runner that talks to ``worker``; never raises for the code's faults.

    ``serve`` sets the logits the job may see, the per-call caps and the grant's serving budget;
    it counts the payload served (``serve.served``).
    """
    runtime = _runtime.ensure_runtime()
    policy = SandboxPolicy(
        limits=limits,
        mounts=tuple(Mount(source=src, target=dst) for src, dst in runtime.mounts),
        hostname="airlock-interp",
        deny_syscalls=DENY_SYSCALLS,
    )
    sandbox = BwrapSandbox(policy)
    host_end, runner_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    job = {"ok": True, "code": spec.code, "filename": spec.filename, "entry_point": spec.entry_point, "args": spec.args}
    server = RpcServer(
        host_end,
        worker,
        job,
        max_result_bytes=max_result_bytes,
        max_model_seconds=float(limits.cpu_seconds) if limits.cpu_seconds is not None else None,
        wall_deadline=time.monotonic() + limits.wall_timeout_s,
        system_prompt=spec.system_prompt,
        max_patch_ratio=max_patch_ratio,
        serve=serve,
    )
    env = {
        FD_ENV: str(runner_end.fileno()),
        # One thread per numerical library: the CPU limit counts every thread of every process,
        # so a pool only spends it faster, and idle pools would eat the memory limit.
        "OPENBLAS_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    server.start()
    cancel_kill = False
    try:
        task = asyncio.ensure_future(
            sandbox.run(runtime.argv, env=env, pass_fds=[runner_end.fileno()], timeout=limits.wall_timeout_s)
        )
        while not task.done():
            await asyncio.wait({task}, timeout=0.2)
            if not task.done() and cancelled():
                cancel_kill = True
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        result = None if cancel_kill else task.result()
    finally:
        runner_end.close()
        # The runner is gone; unblock the server thread if it still waits on a read.
        with contextlib.suppress(OSError):
            host_end.shutdown(socket.SHUT_RDWR)
        server.join()
        host_end.close()
    if result is None:
        return RunOutcome(value=None, logs="", usage={"rpc": server.stats.as_dict()}, error=None)
    usage = {
        "cpu_seconds": round(result.cpu_time_s, 3),
        "wall_seconds": round(result.wall_time_s, 3),
        "max_rss_kib": result.max_rss_kib,
        "exit_code": result.exit_code,
        "termination": result.termination.value,
        "cpu_accounting": result.cpu_accounting,
        "rpc": server.stats.as_dict(),
    }
    logs = result.stdout_text + (("\n" if result.stdout and result.stderr else "") + result.stderr_text)
    return RunOutcome(
        value=server.result if server.has_result else None,
        logs=logs,
        usage=usage,
        error=_diagnose(result, server, limits, max_result_bytes),
    )


# What a process prints when an allocation fails under RLIMIT_AS (Python, C, C++, OpenBLAS).
_ALLOCATION_FAILURE = re.compile(r"MemoryError|Cannot allocate memory|bad_alloc|out of memory|failed to allocate", re.I)
# Signals a process dies of when an allocation it did not check fails (or the OOM killer ends it).
_MEMORY_SIGNALS = frozenset({signal.SIGKILL, signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS})


def _diagnose(result: SandboxResult, server: RpcServer, limits: ResourceLimits, cap: int) -> InterpJobError | None:
    """Turn how the runner ended into a clear job error naming its cause (None: it delivered a result).

    In order: a limit the sandbox enforced (wall clock, CPU over all processes, memory cgroup,
    logs, file size); what the host refused or failed at (host time, replies, patches, verbs,
    result size, broken frames, a host failure); what the runner reported (its code's
    exception); and last, how the runner's process ended (a signal is named for what sent it).
    """
    memory_mib = (limits.memory_bytes or 0) // MiB
    t = result.termination
    if t is Termination.TIMEOUT:
        return InterpJobError(
            f"the job ran past its wall-clock limit of {limits.wall_timeout_s:g} s and was killed", code="timeout"
        )
    if t is Termination.CPU_LIMIT:
        return InterpJobError(
            f"the job used up its CPU limit of {limits.cpu_seconds} s (all its processes together, "
            f"{result.cpu_time_s:.2f} s counted) and was killed",
            code="cpu_limit",
        )
    if t is Termination.MEMORY_LIMIT:
        return InterpJobError(
            f"the job's processes together used more than its memory limit of {memory_mib} MiB and the kernel's "
            "out-of-memory killer ended the runner",
            code="memory_limit",
        )
    if t is Termination.OUTPUT_LIMIT:
        return InterpJobError(
            f"the job printed more than {limits.output_bytes} bytes of logs and was killed", code="log_limit"
        )
    if t is Termination.FILE_SIZE_LIMIT:
        return InterpJobError(
            f"the job tried to write a file larger than {limits.file_size_bytes} bytes and was killed",
            code="file_size_limit",
        )
    if server.host_time_spent is not None:
        message, code = server.host_time_spent
        return InterpJobError(f"{message}; the job was stopped", code=code)
    if server.reply_error is not None:
        return InterpJobError(server.reply_error[0], code=server.reply_error[1])
    if server.patch_refused is not None:
        return InterpJobError(f"the host refused a patch: {server.patch_refused}", code=server.patch_refused.code)
    if server.stats.refused:
        return InterpJobError(f"the job's code made a forbidden call: {server.stats.refused[0]}", code="rpc_refused")
    if server.result_too_large is not None:
        return InterpJobError(
            f"the result is {server.result_too_large} bytes; the per-job cap is {cap} bytes", code="result_too_large"
        )
    if server.protocol_error is not None:
        return InterpJobError(f"the runner broke the RPC protocol: {server.protocol_error}", code="protocol_error")
    delivered = result.exit_code == EXIT_OK and server.has_result
    if server.host_failure is not None and not delivered:
        return InterpJobError(
            f"the host failed while answering the runner ({server.host_failure}); the job did not finish",
            code="host_error",
        )
    if server.error is not None:
        kind, message = server.error["type"], server.error["message"]
        if kind == "MemoryError":
            return InterpJobError(f"the job ran out of memory (limit {memory_mib} MiB): {message}", code="memory_limit")
        if kind == "rpc_refused":
            return InterpJobError(f"the host refused a call: {message}", code="rpc_refused")
        return InterpJobError(f"the job's code raised {kind}: {message}", code="code_error")
    if delivered:
        return None
    if result.signal is not None:
        return _signal_error(result, limits)
    if _ALLOCATION_FAILURE.search(result.stderr_text[-4000:]):
        return InterpJobError(
            f"the runner ran out of memory (limit {memory_mib} MiB) before it could report: "
            + _tail(result.stderr_text),
            code="memory_limit",
        )
    if result.exit_code in (EXIT_USER_ERROR, EXIT_PROTOCOL_ERROR):
        return InterpJobError(
            "the runner failed before it could report: " + _tail(result.stderr_text), code="runner_error"
        )
    return InterpJobError(
        f"the runner exited with status {result.exit_code} without a result: {_tail(result.stderr_text)}",
        code="runner_error",
    )


def _signal_error(result: SandboxResult, limits: ResourceLimits) -> InterpJobError:
    """Name what killed the runner by a signal: its memory limit only on evidence, else the signal's sender."""
    sig = result.signal
    assert sig is not None
    try:
        name = signal.Signals(sig).name
    except ValueError:
        name = f"signal {sig}"
    memory_mib = (limits.memory_bytes or 0) // MiB
    if sig in _MEMORY_SIGNALS:
        evidence = None
        if _ALLOCATION_FAILURE.search(result.stderr_text[-4000:]):
            evidence = "an allocation failed just before"
        elif limits.memory_bytes and result.max_rss_kib * 1024 >= 0.9 * limits.memory_bytes:
            evidence = f"its resident memory had reached {result.max_rss_kib // 1024} MiB"
        if evidence:
            return InterpJobError(
                f"the runner ran out of memory (limit {memory_mib} MiB) and died of {name}: {evidence}",
                code="memory_limit",
            )
    if sig == signal.SIGKILL:
        if result.host_oom_kills:
            return InterpJobError(
                "the runner was killed by SIGKILL while the kernel's out-of-memory killer was active on the host "
                "(the host ran short of memory; the job had not reached its own limits)",
                code="killed",
            )
        return InterpJobError(
            "the runner was killed by SIGKILL, but by none of the job's limits (wall clock, CPU, memory, logs): "
            "a process inside the sandbox sent it, or ended the sandbox's init",
            code="killed",
        )
    return InterpJobError(f"the runner died of {name} (signal {sig})", code="killed")


def _tail(text: str, limit: int = 400) -> str:
    text = text.strip()
    return text[-limit:] if text else "(no output)"


def cpu_limit_for(seconds_left: float | None, default: int) -> int:
    """Return a job's CPU-seconds limit: the default, or what the grant's quota has left."""
    if seconds_left is None:
        return default
    return max(1, min(default, int(seconds_left)))
