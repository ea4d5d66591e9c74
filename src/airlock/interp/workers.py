"""The model an interp job studies: the thread that owns it, the transformers model under any adapter, its size.

Model work runs on the thread that owns the model (the local backend's worker, see
docs/architecture.md "one torch thread per kind of work"): every call reaches the model through
a :class:`ModelWorker`, which runs ``fn(model, tokenizer)`` there and returns a future.

torch is imported inside the functions that run on the model thread, never at module level, so
that importing the interp modules (the job handler does when the gateway starts) does not load it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from airlock.errors import BackendUnavailableError
from airlock.interp.errors import InterpJobError


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
            import torch  # on the model thread only: see the module's note on torch

            with torch.inference_mode():
                return fn(self.model, self.tokenizer)

        return self._pool.submit(run)

    def close(self) -> None:
        """Stop the model thread."""
        self._pool.shutdown(wait=True)


def base_model(model: Any) -> Any:
    """Return the transformers model itself, under any peft wrapper."""
    # A peft-wrapped model (after fine-tuning adapters were loaded) hides the transformers one.
    getter = getattr(model, "get_base_model", None)
    return getter() if callable(getter) else model


@contextlib.contextmanager
def adapters_off(model: Any) -> Iterator[None]:
    """Keep every LoRA adapter of ``model`` out of the forward passes run inside the block."""
    # Interp runs on the variant's own weights: any LoRA adapter stays out of the forward pass.
    disable = getattr(model, "disable_adapter", None)
    if callable(disable):
        with disable():
            yield
    else:
        yield


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
    base = base_model(model)
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
