"""Host time counted while a model call runs: a deadline checked before every layer of the forward pass.

An interp call runs forward passes on the lab's side of the sandbox, outside its CPU limit. A
job's host model time and its wall clock are therefore enforced inside the call: :func:`enforced`
registers forward pre-hooks on the decoder layers (and their attention, MLP and norms) and on the
unembedding of *that* model instance, each checking the clock, and removes them when the call
ends. Past the deadline the next hook raises :class:`DeadlineExceeded`, which unwinds the forward
pass; the hooks never change a module's inputs or outputs. The model is shared with serving, so
the hooks are registered on the model's own thread, for the duration of one call only, and
never globally (no ``torch.nn.modules.module.register_module_forward_pre_hook``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Deadline", "DeadlineExceeded", "checkpoints", "enforced"]

_SUBLAYERS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")


class DeadlineExceeded(Exception):
    """A model call reached its deadline and was stopped; ``code`` is the job error it becomes."""

    def __init__(self, message: str, code: str, checks: int) -> None:
        super().__init__(message)
        self.code = code
        self.checks = checks
        """How many checkpoints the call passed before it was stopped (its progress)."""


@dataclass
class Deadline:
    """When a call must stop (a ``clock()`` reading), and what it is told then."""

    at: float
    message: str
    code: str = "host_time_limit"
    clock: Callable[[], float] = time.monotonic
    checks: int = field(default=0, init=False)
    """Checkpoints passed so far."""

    def check(self) -> None:
        """Raise :class:`DeadlineExceeded` if the deadline has passed; else count a checkpoint."""
        if self.clock() >= self.at:
            raise DeadlineExceeded(self.message, self.code, self.checks)
        self.checks += 1


def checkpoints(model: Any) -> list[Any]:
    """Return the modules of ``model`` checked before they run: each decoder layer, its parts, the unembedding.

    A model without the usual ``model.layers`` gets every submodule checked instead (slower,
    never unbounded).
    """
    getter = getattr(model, "get_base_model", None)
    base = getter() if callable(getter) else model  # a peft wrapper hides the transformers model
    layers = getattr(getattr(base, "model", None), "layers", None)
    if layers is None:
        return [module for module in base.modules() if module is not base]
    found: list[Any] = []
    for layer in layers:
        found.append(layer)
        found.extend(part for name in _SUBLAYERS if (part := getattr(layer, name, None)) is not None)
    head_getter = getattr(base, "get_output_embeddings", None)
    head = head_getter() if callable(head_getter) else None
    if head is not None:
        found.append(head)
    return found


@contextlib.contextmanager
def enforced(model: Any, deadline: Deadline) -> Iterator[Deadline]:
    """Check ``deadline`` before every checkpoint module of ``model`` runs, for the duration of the block.

    Call it on the thread that owns the model. The block is refused at once if the deadline has
    already passed. The hooks are removed however the block ends.
    """

    def hook(_module: Any, _inputs: Any) -> None:
        deadline.check()

    handles = []
    try:
        for module in checkpoints(model):
            handles.append(module.register_forward_pre_hook(hook))
        deadline.check()
        yield deadline
    finally:
        for handle in handles:
            handle.remove()
