"""The model work behind the RPC: ``modules``, ``trace`` and ``generate``, their hooks, patches and cost estimates.

Each verb runs forward passes with forward hooks that read or patch module outputs; no verb
returns a parameter or a gradient, and only allow-listed modules (decoder layers, their parts,
the final norm) can be named. Patches never touch a module whose output feeds the unembedding
(``model.norm``), and ``set``/``add`` patches are bounded, per position, by the norm of the
activation they edit, so the evaluator cannot choose the unembedding's input. Chat-formatted
prompts get the variant's system prompt, whose positions are neither readable nor patchable.

Logits come back as the top-k per position, the requested token ids and each position's
log-sum-exp; the whole vocabulary only where the grant allows it. Full-vocabulary logits still
let a determined evaluator estimate the unembedding up to a linear transform from ordinary
traces (Carlini et al. 2024, "Stealing part of a production language model"); these defences
limit how cheaply and how much, not whether: see docs/interp.md.

Every call is costed from its shapes before any forward pass (:class:`Estimate`: the reply's
size, the payload it serves, the host memory it needs); :class:`ServeBudget` refuses a call over
a cap and counts what each job is served.

These functions run on the model's thread (see :mod:`airlock.interp.workers`); torch is imported
inside them, never at module level, so that importing this module does not load it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import re
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from airlock.interp.errors import PatchRefused, RequestError
from airlock.interp.workers import adapters_off, base_model

if TYPE_CHECKING:
    import torch

MiB = 1024 * 1024
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


_LAYER_PATH = re.compile(r"^model\.layers\.(\d+)(?:\.(self_attn|mlp|input_layernorm|post_attention_layernorm))?$")


def describe(model: Any) -> dict[str, Any]:
    """Return the public shape of ``model``: readable modules and their per-token output shapes."""
    base = base_model(model)
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


def _select(tensor: torch.Tensor, positions: list[list[int]]) -> torch.Tensor:
    """Return ``tensor[b, positions[b]]`` as ``[batch, max positions, ...]`` (rows padded by repetition)."""
    import torch

    width = max(len(p) for p in positions)
    index = torch.tensor([p + [p[-1]] * (width - len(p)) for p in positions], dtype=torch.long, device=tensor.device)
    return tensor.gather(1, index.unsqueeze(-1).expand(-1, -1, tensor.shape[-1]))


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
    base = base_model(model)
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

    base = base_model(model)
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
        with adapters_off(model), hooks:
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
    base = base_model(model)
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
        with adapters_off(model), hooks:
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
