"""The evaluator's library inside an interp job: read and patch activations, steer generation.

Import it in the code you submit (``from airlock.interp import client``). It speaks to the
lab's host over the job's one socket; the model and its weights stay on the host. The RPC:

* :func:`modules` — names and output shapes of the readable modules (never parameters);
* :func:`trace` — a forward pass over prompts that returns the activations of the modules you
  ``read``, logits at the positions you pick (the top ``top_k`` and the ``token_ids`` you name,
  with each position's log-sum-exp; the whole vocabulary only where the grant allows it),
  optional logit-lens read-outs, with ``patch`` edits (:func:`replace`, :func:`add`,
  :func:`ablate`) applied to module outputs;
* :func:`generate` — text generation with the same patches (steering).

Helpers turn common work into one-liners: :func:`logit_lens`, :func:`collect`,
:func:`train_probe`, :func:`mean_difference`, :func:`patching_effects`, :func:`steer`.
:func:`result_sha256` recomputes the digest the lab publishes for a job's result.
Everything here needs only numpy and the standard library.
"""

from __future__ import annotations

import hashlib
import socket
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from airlock.interp import _wire

__all__ = [
    "Probe",
    "RemoteError",
    "Trace",
    "ablate",
    "add",
    "collect",
    "generate",
    "layer",
    "log_softmax",
    "logit_lens",
    "mean_difference",
    "model_info",
    "modules",
    "patching_effects",
    "replace",
    "result_sha256",
    "steer",
    "trace",
    "train_probe",
]

_MAX_REPLY = 1 << 31  # the host caps what it sends; this only bounds a confused stream
_sock: socket.socket | None = None
_lock = threading.Lock()
_info: dict[str, Any] | None = None

Array = np.ndarray[Any, Any]
Prompts = str | Sequence[str]
Positions = int | Sequence[int] | None


class RemoteError(RuntimeError):
    """The host refused or failed a call; the message says why."""


def _attach(sock: socket.socket) -> None:
    """Use ``sock`` for every call (done by the runner before the evaluator's code starts)."""
    global _sock
    _sock = sock


def _call(op: str, **params: Any) -> dict[str, Any]:
    if _sock is None:
        raise RuntimeError("airlock.interp.client works only inside an Airlock interp job")
    with _lock:  # one request in flight: replies are matched to requests by order
        _wire.send(_sock, {"op": op, **params})
        reply, _size = _wire.recv(_sock, _MAX_REPLY)
    if not reply.get("ok"):
        raise RemoteError(str(reply.get("error") or "the host refused the call"))
    return reply


def _prompts(prompts: Prompts) -> list[str]:
    return [prompts] if isinstance(prompts, str) else [str(p) for p in prompts]


# ------------------------------------------------------------------------------------------ patches


def replace(value: Array | Sequence[float], positions: Positions = None) -> dict[str, Any]:
    """Patch: set a module's output to ``value`` (``[hidden]``, or ``[batch, positions, hidden]``)."""
    return {"op": "set", "value": np.asarray(value, dtype=np.float32), "positions": _positions(positions)}


def add(vector: Array | Sequence[float], scale: float = 1.0, positions: Positions = None) -> dict[str, Any]:
    """Patch: add ``scale * vector`` to a module's output (a steering vector), at every or some positions."""
    value = np.asarray(vector, dtype=np.float32) * np.float32(scale)
    return {"op": "add", "value": value, "positions": _positions(positions)}


def ablate(direction: Array | Sequence[float], positions: Positions = None) -> dict[str, Any]:
    """Patch: project ``direction`` out of a module's output (directional ablation)."""
    return {"op": "ablate", "value": np.asarray(direction, dtype=np.float32), "positions": _positions(positions)}


def _positions(positions: Positions) -> list[int] | None:
    if positions is None:
        return None
    return [int(positions)] if isinstance(positions, int | np.integer) else [int(p) for p in positions]


# ------------------------------------------------------------------------------------------ RPC


def modules() -> list[dict[str, Any]]:
    """Return the readable modules: ``[{"name", "kind", "shape"}]`` (shape of one token's output)."""
    return list(_model_info()["modules"])


def model_info() -> dict[str, Any]:
    """Return the model's public shape: ``n_layers``, ``hidden_size``, ``vocab_size`` and ``modules``."""
    return dict(_model_info())


def _model_info() -> dict[str, Any]:
    global _info
    if _info is None:
        _info = _call("modules")
    return _info


def layer(index: int) -> str:
    """Return the module path of decoder layer ``index`` (negative counts from the end)."""
    n = int(_model_info()["n_layers"])
    if not -n <= index < n:
        raise IndexError(f"layer {index} out of range for a model with {n} layers")
    return f"model.layers.{index % n}"


@dataclass
class Trace:
    """What :func:`trace` returns; arrays are ``[batch, positions, ...]`` (zero where a prompt is shorter)."""

    tokens: list[list[str]]
    """Each prompt's tokens, as text."""
    positions: list[list[int]]
    """Each prompt's absolute token positions that the arrays cover."""
    activations: dict[str, Array] = field(default_factory=dict)
    """Module path → its outputs ``[batch, positions, hidden]``."""
    logits: Array | None = None
    """Full next-token logits ``[batch, positions, vocab]``: only with ``logits="full"`` (the grant must allow it)."""
    top_ids: Array | None = None
    """The ``top_k`` most likely next tokens ``[batch, positions, k]``, best first."""
    top_logits: Array | None = None
    """Their logits ``[batch, positions, k]``."""
    token_ids: list[int] = field(default_factory=list)
    """The token ids asked for with ``token_ids=``."""
    token_logits: Array | None = None
    """Their logits ``[batch, positions, len(token_ids)]``."""
    logsumexp: Array | None = None
    """Each position's log-sum-exp over the whole vocabulary ``[batch, positions]`` (the softmax normaliser)."""
    lens: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Module path → logit-lens read-out: ``token_ids``/``logprobs`` ``[batch, positions, k]``, ``tokens``."""

    def logprobs(self) -> Array:
        """Return log-probabilities over the whole vocabulary (needs full logits)."""
        if self.logits is None:
            raise ValueError(
                "this trace has no full logits: use top_logprobs() or token_logprobs(), or trace(..., logits='full') "
                "on a grant that allows full logits"
            )
        return log_softmax(self.logits)

    def top_logprobs(self) -> Array:
        """Return the log-probabilities of :attr:`top_ids` ``[batch, positions, k]``."""
        if self.top_logits is None or self.logsumexp is None:
            raise ValueError("this trace has no logits (trace(..., logits=True))")
        out: Array = self.top_logits.astype(np.float64) - self.logsumexp[..., None]
        return out

    def token_logprobs(self) -> Array:
        """Return the log-probabilities of :attr:`token_ids` ``[batch, positions, len(token_ids)]``."""
        if self.token_logits is None or self.logsumexp is None:
            raise ValueError("this trace has no logits (trace(..., logits=True))")
        out: Array = self.token_logits.astype(np.float64) - self.logsumexp[..., None]
        return out


def trace(
    prompts: Prompts,
    *,
    read: Sequence[str] = (),
    patch: Mapping[str, Array | Mapping[str, Any]] | None = None,
    positions: Positions = None,
    logits: bool | str = True,
    lens: Sequence[str] = (),
    top_k: int = 5,
    token_ids: Sequence[int] | None = None,
    chat: bool = False,
) -> Trace:
    """Run the model over ``prompts`` and return what was asked for.

    Everything a call returns counts against the grant's serving budget (see docs/interp.md).

    Args:
        prompts: one prompt or a list (raw text; ``chat=True`` wraps each as a user message).
        read: module paths whose outputs to return (see :func:`modules`).
        patch: module path → an edit of its output; a bare array means :func:`replace`.
        positions: token positions to return (negative counts from each prompt's end); all if None.
        logits: ``True``: at those positions, the ``top_k`` logits, the logits of ``token_ids`` and
            the log-sum-exp; ``False``: none; ``"full"``: the whole vocabulary (the grant must allow it).
        lens: module paths to read through the final norm and unembedding (logit lens).
        top_k: how many tokens the top logits and each logit-lens read-out keep (at most 64).
        token_ids: token ids whose logits to return at every position (at most 256).
        chat: apply the model's chat template.

    """
    reply = _call(
        "trace",
        prompts=_prompts(prompts),
        read=list(read),
        patch=_patches(patch),
        positions=_positions(positions),
        logits=logits if logits == "full" else bool(logits),
        lens=list(lens),
        top_k=int(top_k),
        token_ids=[int(t) for t in token_ids or ()],
        chat=bool(chat),
    )
    top = reply.get("top_logits") or {}
    wanted = reply.get("token_logits") or {}
    return Trace(
        tokens=reply["tokens"],
        positions=reply["positions"],
        activations=dict(reply.get("activations") or {}),
        logits=reply.get("logits"),
        top_ids=top.get("ids"),
        top_logits=top.get("values"),
        token_ids=[int(t) for t in wanted.get("ids", [])],
        token_logits=wanted.get("values"),
        logsumexp=reply.get("logsumexp"),
        lens=dict(reply.get("lens") or {}),
    )


def generate(
    prompts: Prompts,
    *,
    patch: Mapping[str, Array | Mapping[str, Any]] | None = None,
    max_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    chat: bool = True,
) -> list[str]:
    """Generate a completion for each prompt with ``patch`` applied at every step (steered generation)."""
    reply = _call(
        "generate",
        prompts=_prompts(prompts),
        patch=_patches(patch),
        max_tokens=int(max_tokens),
        temperature=float(temperature),
        top_p=float(top_p),
        seed=seed,
        chat=bool(chat),
    )
    return [str(text) for text in reply["texts"]]


def _patches(patch: Mapping[str, Array | Mapping[str, Any]] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, spec in (patch or {}).items():
        out[str(name)] = dict(spec) if isinstance(spec, Mapping) else replace(spec)
    return out


# ------------------------------------------------------------------------------------------ helpers


def log_softmax(logits: Array) -> Array:
    """Return log-softmax over the last axis, computed stably in float64."""
    x = np.asarray(logits, dtype=np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    out: Array = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return out


def logit_lens(
    prompt: str, *, layers: Sequence[int] | None = None, position: int = -1, top_k: int = 5, chat: bool = False
) -> list[dict[str, Any]]:
    """Return, per layer, the top tokens the residual stream predicts at ``position`` (logit lens)."""
    info = _model_info()
    indices = list(range(int(info["n_layers"]))) if layers is None else [int(i) for i in layers]
    names = [layer(i) for i in indices]
    result = trace(prompt, positions=position, logits=True, lens=names, top_k=top_k, chat=chat)
    rows: list[dict[str, Any]] = []
    for index, name in zip(indices, names, strict=True):
        read = result.lens[name]
        rows.append(
            {
                "layer": index,
                "tokens": list(read["tokens"][0][0]),
                "logprobs": [float(v) for v in read["logprobs"][0, 0]],
            }
        )
    assert result.top_ids is not None
    best, scores = result.top_ids[0, 0], result.top_logprobs()[0, 0]
    rows.append({"layer": "final", "token_ids": [int(i) for i in best], "logprobs": [float(v) for v in scores]})
    return rows


def collect(prompts: Prompts, module: str, *, position: int = -1, batch_size: int = 16, chat: bool = False) -> Array:
    """Return ``module``'s output at ``position`` for each prompt, ``[n_prompts, hidden]`` (batched)."""
    texts = _prompts(prompts)
    parts = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        result = trace(chunk, read=[module], positions=position, logits=False, chat=chat)
        parts.append(result.activations[module][:, 0, :])
    return np.concatenate(parts, axis=0) if parts else np.zeros((0, 0), dtype=np.float32)


@dataclass
class Probe:
    """A linear probe ``sigmoid(x · weights + bias)`` trained by :func:`train_probe`."""

    weights: Array
    bias: float
    mean: Array
    scale: Array
    train_accuracy: float
    test_accuracy: float | None

    def predict_proba(self, x: Array) -> Array:
        """Return P(label 1) for rows of ``x``."""
        z = ((np.asarray(x, dtype=np.float64) - self.mean) / self.scale) @ self.weights + self.bias
        return 1.0 / (1.0 + np.exp(-z))

    def predict(self, x: Array) -> Array:
        """Return predicted labels (0/1) for rows of ``x``."""
        return (self.predict_proba(x) >= 0.5).astype(np.int64)

    def direction(self) -> Array:
        """Return the probe's unit direction in the (unstandardised) activation space."""
        raw = self.weights / self.scale
        return (raw / (np.linalg.norm(raw) or 1.0)).astype(np.float32)


def train_probe(
    x: Array,
    y: Sequence[int] | Array,
    *,
    l2: float = 1e-2,
    steps: int = 500,
    learning_rate: float = 0.5,
    test_fraction: float = 0.25,
    seed: int = 0,
) -> Probe:
    """Train an L2-regularised logistic-regression probe on activations with full-batch gradient descent.

    Features are standardised; a seeded split of ``test_fraction`` is held out for the test accuracy.
    """
    features = np.asarray(x, dtype=np.float64)
    labels = np.asarray(y, dtype=np.float64).reshape(-1)
    if features.ndim != 2 or features.shape[0] != labels.shape[0]:
        raise ValueError(f"x must be [n, d] and y [n]; got {features.shape} and {labels.shape}")
    if not set(np.unique(labels)) <= {0.0, 1.0}:
        raise ValueError("labels must be 0 or 1")
    order = np.random.default_rng(seed).permutation(len(labels))
    n_test = round(len(labels) * test_fraction) if len(labels) >= 8 else 0
    test, train = order[:n_test], order[n_test:]
    mean = features[train].mean(axis=0)
    scale = features[train].std(axis=0) + 1e-6
    z = (features - mean) / scale
    w = np.zeros(z.shape[1])
    b = 0.0
    xt, yt = z[train], labels[train]
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-(xt @ w + b)))
        grad_w = xt.T @ (p - yt) / len(yt) + l2 * w
        grad_b = float(np.mean(p - yt))
        w -= learning_rate * grad_w
        b -= learning_rate * grad_b
    probe = Probe(weights=w, bias=b, mean=mean, scale=scale, train_accuracy=0.0, test_accuracy=None)
    probe.train_accuracy = float(np.mean(probe.predict(features[train]) == labels[train]))
    if n_test:
        probe.test_accuracy = float(np.mean(probe.predict(features[test]) == labels[test]))
    return probe


def mean_difference(positive: Array, negative: Array) -> Array:
    """Return the unit difference-of-means direction between two sets of activations ``[n, hidden]``."""
    diff = np.asarray(positive, dtype=np.float64).mean(axis=0) - np.asarray(negative, dtype=np.float64).mean(axis=0)
    unit: Array = (diff / (np.linalg.norm(diff) or 1.0)).astype(np.float32)
    return unit


def patching_effects(
    clean: str,
    corrupted: str,
    *,
    modules: Sequence[str],
    answer: int,
    position: int = -1,
    chat: bool = False,
) -> dict[str, float]:
    """Activation patching: for each module, how much patching in the clean run restores ``answer``.

    Each module's clean output at ``position`` replaces the corrupted run's; the effect is the
    change of the ``answer`` token's log-probability at the last position, as a fraction of the
    clean-vs-corrupted gap (1.0: fully restored).
    """
    base = trace([clean, corrupted], read=list(modules), positions=position, token_ids=[answer], top_k=1, chat=chat)
    scores = base.token_logprobs()[:, -1, 0]
    gap = float(scores[0] - scores[1]) or 1e-9
    effects: dict[str, float] = {}
    for name in modules:
        clean_act = base.activations[name][0]  # [1, hidden] at `position`
        patch = {name: replace(clean_act, positions=position)}
        patched = trace(corrupted, patch=patch, positions=-1, token_ids=[answer], top_k=1, chat=chat)
        effects[name] = float((patched.token_logprobs()[0, -1, 0] - scores[1]) / gap)
    return effects


def steer(prompts: Prompts, module: str, vector: Array, *, scale: float = 4.0, **sampling: Any) -> list[str]:
    """Generate with ``scale * vector`` added to ``module``'s output at every position."""
    return generate(prompts, patch={module: add(vector, scale)}, **sampling)


# ------------------------------------------------------------------------------------------ result digest

RESULT_FORMAT = "airlock.interp.result/v1"


def result_sha256(value: Any, arrays: Mapping[str, Array]) -> str:
    """Return the SHA-256 the lab records for a job's result (``result_sha256``, also in its ledger entry).

    ``value`` is the result's JSON value as the API returns it (arrays as ``{"__array__": name}``)
    and ``arrays`` its arrays by name (the NPZ). The digest is SHA-256 of the RFC 8785 canonical
    JSON of ``{"format": "airlock.interp.result/v1", "value": value, "arrays": {name: {"dtype",
    "shape", "sha256"}}}``, where each array's ``sha256`` is over its C-order little-endian bytes.
    See docs/interp.md. Runs where Airlock is installed (not inside a job: the runner has no
    canonical-JSON library); a value JSON cannot represent exactly raises ``ValueError``.
    """
    # Evaluator-side only: the in-sandbox runtime imports this module but has no canonical-JSON library.
    from airlock.canonical import canonical_bytes

    described: dict[str, Any] = {}
    for name, array in arrays.items():
        data = np.asarray(array)
        little = np.ascontiguousarray(data, dtype=data.dtype.newbyteorder("<"))
        described[str(name)] = {
            "dtype": data.dtype.name,
            "shape": [int(n) for n in data.shape],
            "sha256": hashlib.sha256(little.tobytes()).hexdigest(),
        }
    envelope = {"format": RESULT_FORMAT, "value": value, "arrays": described}
    return hashlib.sha256(canonical_bytes(envelope)).hexdigest()
