"""Model workers: calls run on the model's own thread, adapters stay off, a tied tensor counts once in its size."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from airlock.backends.local import LocalBackend
from airlock.interp.errors import InterpJobError
from airlock.interp.workers import BackendWorker, ThreadWorker, adapters_off, base_model, model_size, model_size_of


def test_a_thread_worker_runs_every_call_on_its_model_thread_without_autograd(tiny_worker: ThreadWorker) -> None:
    def where(model: Any, _tokenizer: Any) -> tuple[int, str, bool]:
        return threading.get_ident(), threading.current_thread().name, torch.is_inference_mode_enabled()

    first, second = tiny_worker.submit(where).result(), tiny_worker.submit(where).result()
    assert first == second and first[0] != threading.get_ident()
    assert first[1].startswith("airlock-interp-model") and first[2] is True


def test_a_backend_worker_over_a_backend_that_is_not_running_fails_the_job_clearly() -> None:
    worker = BackendWorker(LocalBackend.from_config({"model": "tiny-random"}))
    with pytest.raises(InterpJobError, match="the local backend is not running") as caught:
        worker.submit(lambda model, tokenizer: None)
    assert caught.value.code == "backend_unavailable"


class _Peft:
    """The shape of a peft-wrapped model: the transformers model inside, adapters that can be switched off."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.adapters_on = True

    def get_base_model(self) -> Any:
        return self.inner

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        self.adapters_on = False
        try:
            yield
        finally:
            self.adapters_on = True


def test_interp_sees_the_base_model_with_its_adapters_off() -> None:
    inner = torch.nn.Linear(2, 2)
    wrapped = _Peft(inner)
    assert base_model(wrapped) is inner and base_model(inner) is inner
    with adapters_off(wrapped):
        assert not wrapped.adapters_on
    assert wrapped.adapters_on
    with adapters_off(inner):  # a plain model has no adapters to switch off
        pass


def test_the_model_size_counts_tied_weights_once(tiny_worker: ThreadWorker) -> None:
    model = tiny_worker.model
    size = model_size_of(model)
    every_name = sum(p.numel() for _name, p in model.named_parameters(remove_duplicate=False))
    # The tiny model ties its unembedding to the embeddings: one 49,152 x 64 tensor, counted once.
    assert size.embedding_parameters == 49152 * 64
    assert size.parameters == every_name - size.embedding_parameters
    assert size.parameter_bytes == 4 * size.parameters  # float32
    assert model_size(tiny_worker) == size
