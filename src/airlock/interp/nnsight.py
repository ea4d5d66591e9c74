"""nnsight-style tracing inside an interp job: ``with model.trace(prompt): h = model.model.layers[5].output.save()``.

A numpy-only subset of nnsight's API that runs where the evaluator's code runs (the sandboxed
runner) and turns each ``trace``/``generate`` block into Airlock's policy-checked RPCs
(:mod:`airlock.interp.client`). Nothing here touches the model: inside a block, module outputs
are proxies that record what the code does with them; on leaving the block the recorded reads
and edits become ``trace``/``generate`` calls, and the values of ``.save()``-d proxies are
computed from the replies.

* ``LanguageModel(...)`` mirrors the Hugging Face module tree (``model.model.layers[i]`` with
  ``self_attn``, ``mlp``, ``input_layernorm``, ``post_attention_layernorm``; ``model.model.norm``;
  ``model.lm_head``), built from the host's :func:`~airlock.interp.client.model_info`.
* ``.output`` of a module is a proxy of its ``[batch, tokens, hidden]`` output (``self_attn``'s
  is a tuple whose item 0 is that tensor); ``.input`` is served from the module that feeds it.
  Batches are left-padded, as nnsight's tokenizer pads, so ``[:, -1]`` is each prompt's last token.
* Edits: ``module.output[...] = value`` (``+=`` and friends included) or ``module.output = value``.
  An edit that is, position by position, "add a vector" or "project out a direction" becomes
  :func:`~airlock.interp.client.add`/:func:`~airlock.interp.client.ablate`; others become an
  exact :func:`~airlock.interp.client.replace` (``trace`` only).
* ``model.lm_head.output`` and the logit lens ``model.lm_head(model.model.norm(h))`` are
  :class:`TopLogits`: the top-k and the log-sum-exp, so softmax, ``max``, ``argmax`` and ``topk``
  are exact without the whole vocabulary.
* ``model.generate(prompts, max_new_tokens=...)`` with edits under ``tracer.all()``;
  ``model.generator.output`` (or ``tracer.result``) is the generated text of each prompt.

See docs/interp-nnsight.md for what nnsight does that this cannot.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np

from airlock.interp import client

__all__ = ["Envoy", "LanguageModel", "NNsightError", "Proxy", "TopLogits", "Tracer", "plain"]

Array = np.ndarray[Any, Any]


class NNsightError(RuntimeError):
    """Code that this nnsight subset cannot run remotely; the message says what to do instead."""


# ------------------------------------------------------------------------------------------ graph


class _Node:
    """One recorded operation: ``op`` over ``args`` (nodes or constants)."""

    __slots__ = ("args", "kwargs", "op")

    def __init__(self, op: str, *args: Any, **kwargs: Any) -> None:
        self.op, self.args, self.kwargs = op, args, kwargs


def _node(value: Any) -> Any:
    """Return the graph form of ``value``: proxies become their nodes, inside lists, tuples and slices too."""
    if isinstance(value, Proxy):
        # A value saved by an earlier block is a constant here.
        return value._result if value._done else value._node
    if isinstance(value, list | tuple):
        return type(value)(_node(v) for v in value)
    if isinstance(value, slice):
        return slice(_node(value.start), _node(value.stop), _node(value.step))
    return value


class Proxy:
    """A value that exists only once the trace runs; after the block, a saved proxy stands for its value."""

    __array_priority__ = 1000

    def __init__(self, tracer: Tracer, node: _Node) -> None:
        object.__setattr__(self, "_tracer", tracer)
        object.__setattr__(self, "_node", node)
        object.__setattr__(self, "_done", False)
        object.__setattr__(self, "_result", None)

    # ---- recording
    def _derive(self, op: str, *args: Any, **kwargs: Any) -> Proxy:
        if self._done:
            raise NNsightError("this trace has already run; start a new one")
        return Proxy(self._tracer, _Node(op, *(_node(a) for a in args), **{k: _node(v) for k, v in kwargs.items()}))

    def save(self) -> Proxy:
        """Keep this value after the block (``.value``, or use the proxy itself)."""
        self._tracer._saved.append(self)
        return self

    @property
    def value(self) -> Any:
        """The saved value (only after the block)."""
        if not self._done:
            raise NNsightError("this value is not known yet: use it after the trace block, and .save() it")
        return self._result

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        if self._done:
            return getattr(self._result, name)
        return self._derive("getattr", self, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Record a call of this value (a method such as ``.mean``), or call the saved value."""
        if self._done:
            return self._result(*args, **kwargs)
        return self._derive("call", self, *args, **kwargs)

    def __getitem__(self, key: Any) -> Any:
        if self._done:
            return self._result[key]
        return self._derive("getitem", self, key)

    def __setitem__(self, key: Any, value: Any) -> None:
        if self._done:
            raise NNsightError("this trace has already run; edits belong inside the block")
        self._tracer._edit(self._node, _node(key), _node(value))

    # ---- numpy interop: ufuncs and array functions are recorded too
    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        if method != "__call__":
            return NotImplemented
        if self._done:
            return getattr(ufunc, method)(*(i._result if isinstance(i, Proxy) else i for i in inputs), **kwargs)
        return self._derive("ufunc", ufunc, *inputs, **kwargs)

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        if self._done:
            return func(*_resolved(args), **dict(zip(kwargs, _resolved(tuple(kwargs.values())), strict=True)))
        return self._derive("func", func, *args, **kwargs)

    def __array__(self, dtype: Any = None, copy: Any = None) -> Array:
        if not self._done:
            raise NNsightError("values inside a trace block are not known until the block ends")
        return np.asarray(self._result, dtype=dtype)

    def __bool__(self) -> bool:
        if not self._done:
            raise NNsightError(
                "control flow on a traced value is not supported: its value is known only after the block"
            )
        return bool(self._result)

    def __len__(self) -> int:
        if not self._done:
            raise NNsightError("len() of a traced value is known only after the block")
        return len(self._result)

    def __iter__(self) -> Iterator[Any]:
        if not self._done:
            raise NNsightError("iterating a traced value is possible only after the block")
        return iter(self._result)

    def __float__(self) -> float:
        return float(self.value)

    def __int__(self) -> int:
        return int(self.value)

    def __repr__(self) -> str:
        return repr(self._result) if self._done else f"<Proxy {self._node.op}>"


def _resolved(values: Sequence[Any]) -> list[Any]:
    return [v._result if isinstance(v, Proxy) else v for v in values]


def _binary(fn: Callable[[Any, Any], Any], reflected: bool = False) -> Callable[[Proxy, Any], Any]:
    def method(self: Proxy, other: Any) -> Any:
        if self._done:
            return fn(other, self._result) if reflected else fn(self._result, other)
        return self._derive("rbinop" if reflected else "binop", fn, self, other)

    return method


def _unary(fn: Callable[[Any], Any]) -> Callable[[Proxy], Any]:
    def method(self: Proxy) -> Any:
        return fn(self._result) if self._done else self._derive("unop", fn, self)

    return method


for _name, _fn in {
    "add": operator.add,
    "sub": operator.sub,
    "mul": operator.mul,
    "truediv": operator.truediv,
    "floordiv": operator.floordiv,
    "matmul": operator.matmul,
    "pow": operator.pow,
    "mod": operator.mod,
}.items():
    setattr(Proxy, f"__{_name}__", _binary(_fn))
    setattr(Proxy, f"__r{_name}__", _binary(_fn, reflected=True))
    setattr(Proxy, f"__i{_name}__", _binary(_fn))  # in place on a slice: Python stores it back with __setitem__
for _name, _fn in {"lt": operator.lt, "le": operator.le, "gt": operator.gt, "ge": operator.ge}.items():
    setattr(Proxy, f"__{_name}__", _binary(_fn))
_UNARY: dict[str, Callable[[Any], Any]] = {"neg": operator.neg, "pos": operator.pos, "abs": operator.abs}
for _name, _ufn in _UNARY.items():
    setattr(Proxy, f"__{_name}__", _unary(_ufn))


# ------------------------------------------------------------------------------------------ logits


class _MaxResult(NamedTuple):
    values: Array
    indices: Array


class TopLogits:
    """Logits known at the top ``k`` tokens of each position (best first), with the log-sum-exp.

    ``softmax``, ``log_softmax``, ``max``, ``argmax`` and ``topk`` (up to ``k``) are exact; the
    rest of the vocabulary is not served (see docs/interp.md). Index the leading axes freely; the
    vocabulary axis by the token ids the block names as constants (``logits[:, -1, paris_id]``),
    which the trace asks for by name.
    """

    def __init__(
        self,
        ids: Array,
        values: Array,
        lse: Array,
        vocab: int,
        kind: str = "logits",
        named_ids: Sequence[int] = (),
        named: Array | None = None,
    ) -> None:
        self.ids, self.values, self.lse, self.vocab, self.kind = ids, values, lse, vocab, kind
        self.named_ids = [int(i) for i in named_ids]
        self.named = named if named is not None else np.zeros((*ids.shape[:-1], 0), values.dtype)

    def _like(self, key: Any, values: Array, lse: Array, kind: str, named: Array) -> TopLogits:
        ids = self.ids if key is None else self.ids[key]
        return TopLogits(ids, values, lse, self.vocab, kind, self.named_ids, named)

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the full logits this stands for: ``[..., vocab]``."""
        return (*self.ids.shape[:-1], self.vocab)

    @property
    def ndim(self) -> int:
        """Number of axes, the vocabulary's included."""
        return self.ids.ndim

    def __getitem__(self, key: Any) -> Any:
        keys = key if isinstance(key, tuple) else (key,)
        if Ellipsis in keys or len(keys) >= self.ids.ndim:
            token = keys[-1]
            tokens = [token] if isinstance(token, int | np.integer) else token
            if (Ellipsis in keys or len(keys) == self.ids.ndim) and isinstance(tokens, list | tuple):
                missing = [t for t in tokens if int(t) not in self.named_ids]
                if not missing:
                    columns = [self.named_ids.index(int(t)) for t in tokens]
                    picked = self.named[(*keys[:-1], slice(None))]
                    return picked[..., columns[0]] if tokens is not token else picked[..., columns]
            raise NNsightError(
                "the vocabulary axis of logits can be indexed only by token ids written as constants in the block "
                "(logits[:, -1, token_id]; not for the logit lens): otherwise use .topk(), .max(), .argmax() or "
                ".softmax()"
            )
        return self._like(key, self.values[key], self.lse[key], self.kind, self.named[key])

    def _dim(self, dim: int) -> None:
        if dim not in (-1, self.ids.ndim - 1):
            raise NNsightError("logits reduce over the vocabulary axis only (dim=-1)")

    def log_softmax(self, dim: int = -1) -> TopLogits:
        """Log-probabilities of the top tokens."""
        self._dim(dim)
        zero = np.zeros_like(self.lse)
        return self._like(None, self.values - self.lse[..., None], zero, "logprobs", self.named - self.lse[..., None])

    def softmax(self, dim: int = -1) -> TopLogits:
        """Probabilities of the top tokens (exact; the rest of the vocabulary holds the remainder)."""
        out = self.log_softmax(dim)
        return self._like(None, np.exp(out.values), np.ones_like(self.lse), "probs", np.exp(out.named))

    def max(self, dim: int = -1) -> _MaxResult:
        """``(values, indices)`` of the best token, as ``torch.max(dim=-1)``."""
        self._dim(dim)
        return _MaxResult(self.values[..., 0], self.ids[..., 0])

    def argmax(self, dim: int = -1) -> Array:
        """Return the best token id at each position."""
        return self.max(dim).indices

    def topk(self, k: int, dim: int = -1) -> _MaxResult:
        """``(values, indices)`` of the ``k`` best tokens."""
        self._dim(dim)
        if k > self.ids.shape[-1]:
            raise NNsightError(f"only the top {self.ids.shape[-1]} tokens were served; ask trace(..., top_k={k})")
        return _MaxResult(self.values[..., :k], self.ids[..., :k])

    def detach(self) -> TopLogits:
        """Itself (nothing to detach)."""
        return self

    cpu = float = clone = detach

    def __array__(self, dtype: Any = None, copy: Any = None) -> Array:
        raise NNsightError(
            "the whole vocabulary's logits are not served: use .topk(), .max(), .argmax() or .softmax(), "
            "or model.trace(..., logits='full') on a grant that allows full logits"
        )

    def __repr__(self) -> str:
        return f"TopLogits(shape={self.shape}, k={self.ids.shape[-1]}, kind={self.kind!r})"


def plain(value: Any) -> Any:
    """Return ``value`` with saved proxies replaced by their values, so a job can return them as they are.

    ``TopLogits`` become ``{"token_ids", "values", "kind"}``; the runner applies this to a job's result.
    """
    if isinstance(value, Proxy):
        return plain(value.value)
    if isinstance(value, TopLogits):
        return {"token_ids": value.ids, "values": value.values, "kind": value.kind}
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


# ------------------------------------------------------------------------------------------ envoys


_ATTR_OF = {"dim": "axis", "keepdim": "keepdims"}


def _method(value: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Call ``value.name(...)`` with torch's common tensor methods mapped onto numpy."""
    if not isinstance(value, np.ndarray | np.generic):
        return getattr(value, name)(*args, **kwargs)
    kw = {_ATTR_OF.get(k, k): v for k, v in kwargs.items()}
    if name in ("detach", "cpu", "clone", "contiguous", "to", "numpy"):
        return value.copy() if name == "clone" else value
    if name in ("float", "half", "double"):
        return value.astype(np.float32 if name != "double" else np.float64)
    if name in ("softmax", "log_softmax"):
        axis = args[0] if args else kw.get("axis", -1)
        out = client.log_softmax(np.moveaxis(np.asarray(value), axis, -1))
        return np.moveaxis(np.exp(out) if name == "softmax" else out, -1, axis)
    if name in ("max", "min") and (args or "axis" in kw):
        axis = args[0] if args else kw.pop("axis")
        keep = bool(kw.get("keepdims", False))
        pick = np.argmax if name == "max" else np.argmin
        idx = pick(value, axis=axis, keepdims=keep)
        vals = (np.max if name == "max" else np.min)(value, axis=axis, keepdims=keep)
        return _MaxResult(vals, idx)
    if name == "topk":
        k, axis = int(args[0]), int(args[1] if len(args) > 1 else kw.get("axis", -1))
        idx = np.flip(np.argsort(value, axis=axis), axis=axis).take(range(k), axis=axis)
        return _MaxResult(np.take_along_axis(value, idx, axis=axis), idx)
    if name == "norm":
        axis = args[1] if len(args) > 1 else kw.get("axis")
        return np.linalg.norm(value, axis=axis, keepdims=bool(kw.get("keepdims", False)))
    if name == "unsqueeze":
        return np.expand_dims(value, args[0] if args else kw["axis"])
    if name == "size":
        return value.shape if not args else value.shape[args[0]]
    if name == "view":
        return value.reshape(*args)
    if name == "item":
        return value.item()
    if name in ("sum", "mean", "argmax", "argmin", "std", "var", "squeeze", "cumsum", "prod", "any", "all"):
        if args:
            kw.setdefault("axis", args[0])
        return getattr(value, name)(**kw)
    return getattr(value, name)(*args, **kwargs)


class Envoy:
    """A module of the remote model, named as in Hugging Face (``model.model.layers[3].mlp``)."""

    def __init__(self, lm: LanguageModel, path: str, children: dict[str, Any] | None = None) -> None:
        self._lm, self._path, self._children = lm, path, children or {}

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        children = self.__dict__.get("_children", {})
        if name in children:
            return children[name]
        raise AttributeError(
            f"{self.__dict__.get('_path') or 'the model'} has no readable module {name!r} "
            f"(readable: {', '.join(children) or 'none below this one'})"
        )

    def __repr__(self) -> str:
        return f"<Envoy {self._path}>"

    @property
    def output(self) -> Proxy:
        """Return the proxy of the module's output in the current trace."""
        return self._lm._tracer_now().module(self._path)

    @output.setter
    def output(self, value: Any) -> None:
        tracer = self._lm._tracer_now()
        tracer._edit(tracer.module(self._path)._node, slice(None), _node(value))

    @property
    def input(self) -> Proxy:
        """Return the proxy of the module's (first) input, served from the module that produces it."""
        return self._lm._tracer_now().module_input(self._path)

    @input.setter
    def input(self, value: Any) -> None:
        raise NNsightError("editing a module's input is not supported: edit the output of the module before it")

    def __call__(self, value: Any) -> Proxy:
        """Apply the final norm and unembedding to a layer's own output (the logit lens); nothing else."""
        return self._lm._tracer_now().apply(self._path, value)


class EnvoyList(Envoy):
    """``model.model.layers``: index, slice, iterate."""

    def __init__(self, lm: LanguageModel, path: str, items: list[Envoy]) -> None:
        super().__init__(lm, path)
        self._items = items

    def __getitem__(self, index: int | slice) -> Any:
        return self._items[index]

    def __iter__(self) -> Iterator[Envoy]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


# ------------------------------------------------------------------------------------------ model


class LanguageModel:
    """The remote model as nnsight's ``LanguageModel``; ``remote=True`` (the default) is the only mode."""

    def __init__(self, model_id: str | None = None, **_settings: Any) -> None:
        # The lab decides which model the job studies; the name is kept only for repr.
        self.model_id = model_id
        self._active: Tracer | None = None
        self._tree: Envoy | None = None
        self.generator = _GeneratorEnvoy(self)

    def _root(self) -> Envoy:
        if self._tree is None:
            info = client.model_info()
            names = {m["name"] for m in info["modules"]}
            layers = []
            for index in range(int(info["n_layers"])):
                prefix = f"model.layers.{index}"
                subs = {
                    s: Envoy(self, f"{prefix}.{s}")
                    for s in ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")
                    if f"{prefix}.{s}" in names
                }
                layers.append(Envoy(self, prefix, subs))
            inner = Envoy(self, "model", {"layers": EnvoyList(self, "model.layers", layers)})
            inner._children["norm"] = Envoy(self, "model.norm")
            self._tree = Envoy(self, "", {"model": inner, "lm_head": Envoy(self, "lm_head")})
            self._info = info
        return self._tree

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if name == "tokenizer":
            raise NNsightError("the tokenizer stays with the lab: pass text, and read tokens from tracer.tokens")
        return getattr(self._root(), name)

    def _tracer_now(self) -> Tracer:
        if self._active is None:
            raise NNsightError("module outputs exist only inside `with model.trace(...)` or `model.generate(...)`")
        return self._active

    def trace(self, *prompts: Any, remote: bool = True, **options: Any) -> Tracer:
        """Open a forward pass over ``prompts`` (a string or a list); options: ``chat``, ``top_k``, ``logits``."""
        return Tracer(self, _prompt_args(prompts), remote=remote, generate=None, **options)

    def generate(
        self,
        *prompts: Any,
        max_new_tokens: int = 20,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        remote: bool = True,
        **options: Any,
    ) -> Tracer:
        """Open a generation over ``prompts``; edits under ``tracer.all()`` apply at every step."""
        sampling = {
            "max_tokens": int(max_new_tokens),
            "temperature": float(temperature) if do_sample else 0.0,
            "top_p": float(top_p),
            "seed": seed,
        }
        return Tracer(self, _prompt_args(prompts), remote=remote, generate=sampling, **options)

    def __repr__(self) -> str:
        return f"LanguageModel({self.model_id!r}, remote)"


class _GeneratorEnvoy:
    """``model.generator``: its ``.output`` is the generated text of each prompt."""

    def __init__(self, lm: LanguageModel) -> None:
        self._lm = lm

    @property
    def output(self) -> Proxy:
        """The generated continuations (a list of strings, one per prompt)."""
        tracer = self._lm._tracer_now()
        if tracer._sampling is None:
            raise NNsightError("model.generator.output exists only inside model.generate(...)")
        return Proxy(tracer, _Node("generated"))


def _prompt_args(prompts: tuple[Any, ...]) -> list[str] | None:
    if not prompts:
        return None
    if len(prompts) == 1:
        only = prompts[0]
        return [only] if isinstance(only, str) else [str(p) for p in only]
    return [str(p) for p in prompts]


# ------------------------------------------------------------------------------------------ tracer


_MODULES_ON_VALUES = (
    "modules run on the lab's side only on the model's own activations: "
    "model.lm_head(model.model.norm(<a layer's .output>)) (the logit lens) is supported"
)


class _Edit(NamedTuple):
    target: _Node
    key: Any
    value: Any
    every_step: bool


class Tracer:
    """A ``trace`` or ``generate`` block: records reads and edits, runs them on leaving the block."""

    def __init__(
        self,
        lm: LanguageModel,
        prompts: list[str] | None,
        *,
        remote: bool,
        generate: dict[str, Any] | None,
        chat: bool = False,
        top_k: int | None = None,
        logits: bool | str = True,
        **unsupported: Any,
    ) -> None:
        if not remote:
            raise NNsightError("the model's weights stay with the lab: only remote=True is possible")
        if unsupported:
            raise NNsightError(f"options not supported remotely: {', '.join(sorted(unsupported))}")
        self._lm, self._prompts, self._sampling = lm, list(prompts or []), generate
        self._chat, self._top_k, self._logits = bool(chat), top_k, logits
        self._saved: list[Proxy] = []
        self._edits: list[_Edit] = []
        self._every_step = False
        self._rows: slice | None = None
        self._modules: dict[str, _Node] = {}
        self.tokens: list[list[str]] = []
        self.result: Proxy | None = None

    # ---- the block
    def __enter__(self) -> Tracer:
        if self._lm._active is not None:
            raise NNsightError("trace blocks cannot be nested")
        self._lm._root()
        self._lm._active = self
        if self._sampling is not None:
            self.result = Proxy(self, _Node("generated"))
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._lm._active = None
        if exc_type is not None:
            return
        if not self._prompts:
            raise NNsightError("no prompts: pass them to model.trace(...) or tracer.invoke(...)")
        _Run(self).run()

    def invoke(self, *prompts: Any) -> _Invoke:
        """Add prompts to the batch; inside ``with tracer.invoke(...)``, module outputs are those prompts' rows."""
        start = len(self._prompts)
        self._prompts.extend(_prompt_args(prompts) or [])
        return _Invoke(rows_of=self, rows=slice(start, len(self._prompts)))

    def all(self) -> _Invoke:
        """Within this block, edits apply at every generation step (the only kind ``generate`` can run)."""
        return _Invoke(self)

    def stop(self) -> None:
        """Do nothing: accepted for compatibility, the forward pass always runs to the end."""

    # ---- recording
    def module(self, path: str) -> Proxy:
        """Return the proxy of ``path``'s output (one node per module and block)."""
        node = self._modules.setdefault(path, _Node("logits") if path == "lm_head" else _Node("module", path))
        return self._within(node)

    def _within(self, node: _Node) -> Proxy:
        """Return ``node`` as seen from the current invoke: its rows of the batch."""
        return Proxy(self, node if self._rows is None else _Node("rows", node, self._rows))

    def module_input(self, path: str) -> Proxy:
        """Return the proxy of ``path``'s input, as the output of the module that feeds it."""
        parts = path.split(".")
        if path == "lm_head":
            return self.module("model.norm")
        if path == "model.norm":
            return self.module(f"model.layers.{len(self._lm.model.layers) - 1}")
        if len(parts) >= 3 and parts[1] == "layers":
            index = int(parts[2])
            sub = parts[3] if len(parts) > 3 else None
            prefix = f"model.layers.{index}"
            if sub == "self_attn":
                return self.module(f"{prefix}.input_layernorm")
            if sub == "mlp":
                return self.module(f"{prefix}.post_attention_layernorm")
            if sub == "post_attention_layernorm":
                # The residual stream after attention: the layer's input plus attention's output.
                before: Proxy = self.module_input(prefix) + self.module(f"{prefix}.self_attn")[0]
                return before
            if index == 0:
                raise NNsightError("the first layer's input is the token embeddings, which are not readable")
            return self.module(f"model.layers.{index - 1}")
        raise NNsightError(f"the input of {path!r} is not readable")

    def apply(self, path: str, value: Any) -> Proxy:
        """Return ``module(value)``: only the logit lens, ``lm_head(norm(<a layer's output>))``."""
        # model.model.norm(h) is only a step towards model.lm_head(...): alone it cannot be computed.
        if path == "model.norm":
            return Proxy(self, _Node("norm", _node(value)))
        if path == "lm_head":
            inner = _node(value)
            if isinstance(inner, _Node) and inner.op == "norm":
                source, rows = _unrows(inner.args[0])
                if _module_path(source) is not None:
                    lens = _Node("lens", _module_path(source))
                    return Proxy(self, lens if rows is None else _Node("rows", lens, rows))
            source, _rows = _unrows(inner)
            if isinstance(source, _Node) and source.op == "module" and source.args[0] == "model.norm":
                return self.module("lm_head")
        raise NNsightError(_MODULES_ON_VALUES)

    def _edit(self, target: _Node, key: Any, value: Any) -> None:
        self._edits.append(_Edit(target, key, value, self._every_step))


class _Invoke:
    """The context of ``tracer.invoke(...)`` (its batch rows) and ``tracer.all()`` (every step)."""

    def __init__(
        self, every_step_of: Tracer | None = None, rows_of: Tracer | None = None, rows: slice | None = None
    ) -> None:
        self._tracer, self._rows_of, self._rows = every_step_of, rows_of, rows

    def __enter__(self) -> _Invoke:
        if self._tracer is not None:
            self._tracer._every_step = True
        if self._rows_of is not None:
            self._rows_of._rows = self._rows
        return self

    def __exit__(self, *_exc: Any) -> None:
        if self._tracer is not None:
            self._tracer._every_step = False
        if self._rows_of is not None:
            self._rows_of._rows = None


def _unrows(node: Any) -> tuple[Any, slice | None]:
    """Split an invoke's view of a value into the value and its rows (``None``: the whole batch)."""
    if isinstance(node, _Node) and node.op == "rows":
        return node.args[0], node.args[1]
    if isinstance(node, _Node) and node.op == "getitem" and isinstance(node.args[0], _Node):
        inner, rows = _unrows(node.args[0])
        if rows is not None:
            return _Node("getitem", inner, node.args[1]), rows
    return node, None


def _module_path(node: Any) -> str | None:
    """Return the module whose unedited output ``node`` is (a layer's output, or item 0 of attention's tuple)."""
    if isinstance(node, _Node) and node.op == "getitem" and node.args[1] == 0:
        node = node.args[0]
        if isinstance(node, _Node) and node.op == "module" and str(node.args[0]).endswith("self_attn"):
            return str(node.args[0])
        return None
    if isinstance(node, _Node) and node.op == "module" and not str(node.args[0]).endswith("self_attn"):
        return str(node.args[0])
    return None


# ------------------------------------------------------------------------------------------ running


def _walk(node: Any, seen: set[int] | None = None) -> Iterator[_Node]:
    """Every node ``node`` depends on, itself included."""
    seen = set() if seen is None else seen
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, _Node) and id(item) not in seen:
            seen.add(id(item))
            yield item
            stack.extend(item.args)
            stack.extend(item.kwargs.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
        elif isinstance(item, slice):
            stack.extend((item.start, item.stop, item.step))


class _Run:
    """Turns a finished block into RPCs and fills in the saved proxies."""

    def __init__(self, tracer: Tracer) -> None:
        self.t = tracer
        self.hidden = int(tracer._lm._info["hidden_size"])
        self.vocab = int(tracer._lm._info["vocab_size"])
        self.patches: dict[str, dict[str, Any]] = {}
        self.lengths: list[int] | None = None

    def run(self) -> None:
        t = self.t
        for edit in t._edits:
            self._plan_edit(edit)
        roots = [p._node for p in t._saved]
        env: dict[int, Any] = {}
        if t._sampling is not None:
            texts = client.generate(t._prompts, patch=self.patches, chat=t._chat, **t._sampling)
            for node in (n for r in roots for n in _walk(r) if n.op == "generated"):
                env[id(node)] = texts
        reads = [n for r in roots for n in _walk(r) if n.op in ("module", "logits", "lens")]
        if reads:
            env.update(self._read(reads, roots))
        for proxy in t._saved:
            value = _evaluate(proxy._node, env)
            object.__setattr__(proxy, "_result", value)
            object.__setattr__(proxy, "_done", True)

    # ---- reads
    def _read(self, reads: list[_Node], roots: list[_Node], patches: dict[str, Any] | None = None) -> dict[int, Any]:
        """One ``trace`` call that serves every read node, laid out left-padded."""
        t = self.t
        paths = sorted({str(n.args[0]) for n in reads if n.op == "module"})
        lens = sorted({str(n.args[0]) for n in reads if n.op == "lens"})
        want_logits = any(n.op == "logits" for n in reads)
        positions = _positions(reads, roots)
        top_k = t._top_k or max([5, *_topk_sizes(roots)])
        named = _named_tokens(roots) if want_logits else []
        logits: bool | str = t._logits if want_logits else False
        reply = client.trace(
            t._prompts,
            read=paths,
            patch=self.patches if patches is None else patches,
            positions=positions,
            logits=logits,
            lens=lens,
            top_k=min(top_k, 64),
            token_ids=named,
            chat=t._chat,
        )
        t.tokens = reply.tokens
        layout = _Layout(reply.tokens, reply.positions)
        env: dict[int, Any] = {}
        for node in reads:
            if node.op == "module":
                array = layout.place(reply.activations[str(node.args[0])])
                env[id(node)] = (array, None) if str(node.args[0]).endswith("self_attn") else array
            elif node.op == "lens":
                read = reply.lens[str(node.args[0])]
                ids = layout.place(np.asarray(read["token_ids"]))
                values = layout.place(np.asarray(read["logprobs"], dtype=np.float32))
                env[id(node)] = TopLogits(ids, values, np.zeros(ids.shape[:-1], np.float32), self.vocab, "logprobs")
            elif reply.logits is not None:
                env[id(node)] = layout.place(reply.logits)
            else:
                assert reply.top_ids is not None and reply.top_logits is not None and reply.logsumexp is not None
                lse = layout.place(reply.logsumexp[..., None])[..., 0]
                wanted = layout.place(reply.token_logits) if reply.token_logits is not None and named else None
                top = layout.place(reply.top_ids), layout.place(reply.top_logits)
                env[id(node)] = TopLogits(*top, lse, self.vocab, "logits", reply.token_ids, wanted)
        return env

    # ---- edits
    def _plan_edit(self, edit: _Edit) -> None:
        # Walk from the assigned-into value down to the module: out[k1][k2]...[key] = value.
        keys, node, rows = [edit.key], edit.target, None
        while node.op in ("getitem", "rows") and isinstance(node.args[0], _Node):
            if node.op == "rows":
                rows = node.args[1]  # an invoke's rows: applied first, to the tuple's tensor or the tensor
            else:
                keys.insert(0, node.args[1])
            node = node.args[0]
        path = str(node.args[0]) if node.op == "module" else None
        unit = path is not None and path.endswith("self_attn")
        if unit and (len(keys) < 2 or keys[0] != 0):
            path = None  # attention's output is a tuple: only its tensor (item 0) can be edited
        if path is None:
            raise NNsightError(
                "edits must assign into a module's output tensor, e.g. model.model.layers[3].output[:] = value "
                "(attention: .self_attn.output[0][:] = value)"
            )
        if unit:
            keys = keys[1:]
        if rows is not None:
            keys.insert(0, rows)
        if path in self.patches:
            raise NNsightError(f"{path} is edited twice in one block: combine the edits into one assignment")
        generating = self.t._sampling is not None
        # Outside tracer.all(), nnsight edits the first step only: the prompt's pass. Airlock's
        # generate applies an edit with positions to the prompt's tokens only, which is that step.
        first_step = generating and not edit.every_step
        deps = [n for n in _walk((edit.value, keys)) if n.op in ("module", "logits", "lens", "generated")]
        if not deps and (first_step or not generating):
            spec = self._at_positions(keys, edit.value)
            if spec is not None:
                self.patches[path] = spec
                return
        if all(n is node for n in deps):
            spec = self._affine(node, unit, keys, edit.value)
            if spec is not None:
                if spec and first_step:
                    spec["positions"] = self._prompt_positions()
                if spec:
                    self.patches[path] = spec
                return
        if generating:
            raise NNsightError(
                f"the edit of {path} is not 'add a vector', 'set a vector' or 'project out a direction' at every "
                "position of every prompt (or, outside tracer.all(), a constant written into some prompt "
                "positions), which is all generate can apply"
            )
        self.patches[path] = self._exact(path, node, unit, keys, edit.value, deps)

    def _prompt_positions(self) -> list[int]:
        """Return every prompt position after the system prompt, from the end (the prompts must be equally long)."""
        if self.lengths is None:
            # Tokens are the prompts' own text: a call with nothing read serves nothing from the model.
            reply = client.trace(self.t._prompts, logits=False, chat=self.t._chat)
            self.lengths = [sum(1 for token in tokens if token != "<system>") for tokens in reply.tokens]
        if len(set(self.lengths)) > 1:
            raise NNsightError(
                "an edit of the prompt's pass in generate (outside tracer.all()) needs prompts of equal length"
            )
        return list(range(-self.lengths[0], 0))

    def _at_positions(self, keys: list[Any], value: Any) -> dict[str, Any] | None:
        """Return a constant edit of some token positions (``out[:, -1] = v``) as a positioned replace, or None."""
        key = keys[0] if len(keys) == 1 else None
        if not isinstance(key, tuple) or not 2 <= len(key) <= 3 or key[0] != slice(None):
            return None
        if len(key) == 3 and key[2] not in (slice(None), Ellipsis):
            return None
        seq = key[1]
        positions = [seq] if isinstance(seq, int) else seq if isinstance(seq, list) else None
        batch = len(self.t._prompts)
        if not positions or not all(isinstance(p, int) for p in positions):
            return None
        if batch > 1 and not all(p < 0 for p in positions):
            return None  # left padding moves non-negative positions; the exact path handles equal lengths
        try:
            shape = (batch, self.hidden) if isinstance(seq, int) else (batch, len(positions), self.hidden)
            block = np.broadcast_to(np.asarray(value, dtype=np.float32), shape)
        except ValueError:
            return None
        return client.replace(block.reshape(batch, len(positions), self.hidden), positions=positions)

    def _affine(self, module: _Node, unit: bool, keys: list[Any], value: Any) -> dict[str, Any] | None:
        """Classify the edit, position by position, as add / ablate / set (``{}``: no change), or None."""
        h, batch = self.hidden, len(self.t._prompts)

        def edited(x: Array) -> Array:
            out = x.copy()
            env = {id(module): (out, None) if unit else out}
            _assign(out, [_evaluate(k, env) for k in keys], _evaluate(value, env))
            return out

        # One prompt of h + 1 positions (zero, then each unit vector) gives the affine map's offset
        # and matrix; random inputs of the real batch size then check that it holds for every row.
        probe = np.concatenate([np.zeros((1, h)), np.eye(h)])[None].astype(np.float32)
        sample = np.random.default_rng(0).standard_normal((batch, 3, h)).astype(np.float32)
        try:
            y, check = edited(probe), edited(sample)
        except (ValueError, IndexError, TypeError, NNsightError):
            return None  # not position-wise (shapes tied to the prompt): an exact replacement instead
        c = y[0, 0].astype(np.float64)
        m = y[0, 1:].astype(np.float64) - c
        scale = max(1.0, float(np.abs(check).max()))
        if not np.allclose(check, c + sample @ m, atol=1e-4 * scale):
            return None
        eye = np.eye(h)
        if np.allclose(m, eye, atol=1e-5):
            return {} if not c.any() else client.add(c)
        if np.allclose(m, 0.0, atol=1e-6):
            return client.replace(c)
        p = eye - m
        if np.allclose(c, 0.0, atol=1e-6) and round(float(np.trace(p))) == 1:
            # A rank-one orthogonal projection p = d d^T (unit d): read d off its largest column.
            column = int(np.argmax(np.diag(p)))
            direction = p[:, column] / np.sqrt(max(p[column, column], 1e-30))
            if np.allclose(p, np.outer(direction, direction), atol=1e-5):
                return client.ablate(direction)
        return None

    def _exact(
        self, path: str, module: _Node, unit: bool, keys: list[Any], value: Any, deps: list[_Node]
    ) -> dict[str, Any]:
        """Read what the edit needs under the edits so far, compute the new output, replace it exactly."""
        env = self._read([module, *(d for d in deps if d is not module)], [module], dict(self.patches))
        tokens = self.t.tokens
        if len({len(t) for t in tokens}) > 1:
            raise NNsightError(
                f"this edit of {path} is not 'add', 'set' or 'ablate' at every position, so it needs an exact "
                "replacement, which Airlock applies to prompts of equal length only"
            )
        current = env[id(module)]
        new = np.array(current[0] if unit else current, dtype=np.float32, copy=True)
        env[id(module)] = (new, None) if unit else new
        _assign(new, [_evaluate(k, env) for k in keys], _evaluate(value, env))
        skip = sum(1 for token in tokens[0] if token == "<system>")
        return client.replace(new[:, skip:, :])


def _assign(out: Array, keys: list[Any], value: Any) -> None:
    """``out[k1][k2]...[kn] = value``, in place (each step but the last must be a view, as in torch)."""
    target = out
    for key in keys[:-1]:
        target = target[key]
        if target.size and not np.shares_memory(target, out):
            raise NNsightError("chained indexing that copies (fancy indexing) cannot be assigned into")
    target[keys[-1]] = np.asarray(value.value if isinstance(value, Proxy) else value)


class _Layout:
    """Places ``[batch, positions, ...]`` replies into left-padded ``[batch, tokens, ...]`` arrays."""

    def __init__(self, tokens: list[list[str]], positions: list[list[int]]) -> None:
        self.tokens, self.positions = tokens, positions
        self.width = max(len(t) for t in tokens)

    def place(self, array: Array) -> Array:
        array = np.asarray(array)
        out = np.zeros((array.shape[0], self.width, *array.shape[2:]), dtype=array.dtype)
        for b, (tokens, positions) in enumerate(zip(self.tokens, self.positions, strict=True)):
            offset = self.width - len(tokens)
            for j, p in enumerate(positions):
                out[b, offset + p] = array[b, j]
        return out


def _consumers(roots: list[_Node]) -> dict[int, list[_Node]]:
    users: dict[int, list[_Node]] = {}
    for node in (n for r in roots for n in _walk(r)):
        for arg in (*node.args, *node.kwargs.values()):
            if isinstance(arg, _Node):
                users.setdefault(id(arg), []).append(node)
    return users


def _positions(reads: list[_Node], roots: list[_Node]) -> list[int] | None:
    """Return the positions the code uses: only negative token indices (``[:, -1]``) narrow the read."""
    users = _consumers(roots)
    wanted: set[int] = set()
    for read in reads:
        views = [read]
        # An invoke's rows do not change which token positions the code uses.
        rows = [u for u in users.get(id(read), []) if u.op == "rows"]
        if rows:
            if len(rows) != len(users.get(id(read), [])) or read in roots:
                return None
            views = rows
        frontier = []
        for view in views:
            if read.op == "module" and str(read.args[0]).endswith("self_attn"):
                items = [u for u in users.get(id(view), []) if u.op == "getitem" and u.args[1] == 0]
                if len(items) != len(users.get(id(view), [])) or view in roots:
                    return None
                frontier.extend(items)
            else:
                frontier.append(view)
        for node in frontier:
            uses = users.get(id(node), [])
            if node in roots or not uses:
                return None
            for use in uses:
                key = use.args[1] if use.op == "getitem" else None
                token = key[1] if isinstance(key, tuple) and len(key) >= 2 else None
                if not (isinstance(token, int) and token < 0) or (isinstance(key, tuple) and key[0] is Ellipsis):
                    return None
                wanted.add(token)
    return sorted(wanted) or None


def _topk_sizes(roots: list[_Node]) -> list[int]:
    sizes: list[int] = []
    for node in (n for r in roots for n in _walk(r)):
        fn = node.args[0] if node.op == "call" else None
        if isinstance(fn, _Node) and fn.op == "getattr" and fn.args[1] == "topk" and len(node.args) > 1:
            sizes.extend(k for k in node.args[1:2] if isinstance(k, int))
    return sizes


def _named_tokens(roots: list[_Node]) -> list[int]:
    """Return the token ids the block indexes the logits' vocabulary axis by (``logits[:, -1, 1234]``)."""
    found: list[int] = []
    for node in (n for r in roots for n in _walk(r)):
        key = node.args[1] if node.op == "getitem" else None
        if not isinstance(key, tuple) or len(key) < 2:
            continue
        token = key[-1]
        tokens = [token] if isinstance(token, int) else token if isinstance(token, list) else []
        base = node.args[0]
        # Through softmax/log_softmax and leading-axis indexing back to the model's own logits.
        while isinstance(base, _Node) and base.op in ("getitem", "call", "getattr", "rows"):
            base = base.args[0]
        if isinstance(base, _Node) and base.op == "logits":
            found.extend(int(t) for t in tokens if isinstance(t, int) and t >= 0)
    return sorted(set(found))[:256]


def _evaluate(root: Any, env: dict[int, Any]) -> Any:
    """Return the value of ``root`` given the values of its module reads in ``env``."""
    memo: dict[int, Any] = {}

    def ev(item: Any) -> Any:
        if isinstance(item, _Node):
            key = id(item)
            if key in env:
                return env[key]
            if key not in memo:
                memo[key] = apply(item)
            return memo[key]
        if isinstance(item, tuple):
            return tuple(ev(i) for i in item)
        if isinstance(item, list):
            return [ev(i) for i in item]
        if isinstance(item, slice):
            return slice(ev(item.start), ev(item.stop), ev(item.step))
        return item

    def apply(node: _Node) -> Any:
        args = [ev(a) for a in node.args]
        kwargs = {k: ev(v) for k, v in node.kwargs.items()}
        if node.op == "getitem":
            return args[0][args[1]]
        if node.op == "rows":
            if isinstance(args[0], tuple):  # attention's (tensor, None)
                return tuple(None if item is None else item[args[1]] for item in args[0])
            return args[0][args[1]]
        if node.op == "getattr":
            try:
                attr = getattr(args[0], args[1])
            except AttributeError:
                return _Bound(args[0], args[1])  # a torch method numpy lacks: mapped when called
            return _Bound(args[0], args[1]) if callable(attr) else attr
        if node.op == "call":
            fn = args[0]
            if isinstance(fn, _Bound):
                return _method(fn.obj, fn.name, tuple(args[1:]), kwargs)
            return fn(*args[1:], **kwargs)
        if node.op == "binop":
            return args[0](args[1], args[2])
        if node.op == "rbinop":
            return args[0](args[2], args[1])
        if node.op == "unop":
            return args[0](args[1])
        if node.op in ("ufunc", "func"):
            return args[0](*args[1:], **kwargs)
        raise NNsightError(_MODULES_ON_VALUES if node.op == "norm" else f"cannot compute {node.op!r} here")

    return ev(root)


class _Bound:
    """``value.name`` of a method, before it is called."""

    def __init__(self, obj: Any, name: str) -> None:
        self.obj, self.name = obj, name
