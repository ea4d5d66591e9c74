"""Model workers as Ray actors: one per loaded weights, placed on a node holding them; the gateway only forwards.

:class:`ModelWorkerActor` owns a :class:`~airlock.backends.local.LocalBackend` on its node (with its
dynamic batching, adapters and model thread) and also runs the jobs that need those weights
(interpretability: the sandbox starts on that node and talks to this worker locally).
:class:`RayModelBackend` is what the gateway's backend pool holds instead of the weights: a
:class:`~airlock.backends.base.ModelBackend` whose every call is an actor call. A worker that dies
(its process or node) is restarted by Ray; calls that were in flight end as a 503 with
``Retry-After``, never as a hang or a 500.

A noise-injected variant's copy of the weights is a worker of its own, named per ``(job, sigma,
seed)`` (``airlock-noise-…``). The gateway that retires the copy (at expiry, or evicting it) kills
that worker for good (:meth:`RayModelBackend.retire`); a base variant's worker, shared by every
replica, is never killed by a gateway. And the worker knows its expiry: it kills itself
:data:`NOISE_EXIT_GRACE_S` after it, so a copy whose gateways all crashed does not outlive it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from airlock.backends.base import ModelBackend
from airlock.backends.protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
)
from airlock.backends.tokenization import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from airlock.cluster.placement import connect, placement_of
from airlock.config import Settings
from airlock.errors import AirlockError, BackendError, BackendUnavailableError

__all__ = [
    "NOISE_EXIT_GRACE_S",
    "RETRY_AFTER_S",
    "ModelWorkerActor",
    "RayModelBackend",
    "is_noise_copy",
    "model_worker",
    "worker_name",
]

log = logging.getLogger(__name__)

#: What a client is told to wait after its model worker died: about the time Ray needs to restart it.
RETRY_AFTER_S = 5.0
#: How long after its expiry a noised copy's worker kills itself: the gateways retire it at expiry,
#: this is the backstop for gateways gone; the margin absorbs clock skew between nodes.
NOISE_EXIT_GRACE_S = 10.0
_CLUSTER_KEYS = ("num_gpus",)


def is_noise_copy(config: dict[str, Any]) -> bool:
    """Whether a local backend ``config`` is a noise-injected variant's own copy of the weights."""
    return config.get("noise_sigma") is not None


def worker_name(config: dict[str, Any]) -> str:
    """Return the Ray actor name of the model worker for a local backend ``config`` (equal configs share one)."""
    body = json.dumps(config, sort_keys=True)
    prefix = "airlock-noise-" if is_noise_copy(config) else "airlock-model-"
    return prefix + hashlib.sha256(body.encode()).hexdigest()[:16]


def _exit_delay_s(config: dict[str, Any], now: datetime) -> float | None:
    """Seconds until a noised copy's worker must be gone (None: a base variant's worker, or no expiry known)."""
    at = config.get("noise_expires_at")
    if not is_noise_copy(config) or not isinstance(at, str):
        return None
    expires_at = datetime.fromisoformat(at)
    if expires_at.tzinfo is None:  # the gateway's clock is UTC
        expires_at = expires_at.replace(tzinfo=UTC)
    return max(0.0, (expires_at - now).total_seconds() + NOISE_EXIT_GRACE_S)


def _kill_self() -> None:
    """Kill the current actor for good: Ray neither restarts it nor keeps its name."""
    import ray

    ray.kill(ray.get_runtime_context().current_actor, no_restart=True)


class ModelWorkerActor:
    """A Ray actor holding one local backend on its node; the weights load on first use (and after a restart)."""

    def __init__(self, config: dict[str, Any]) -> None:
        self._config = {k: v for k, v in config.items() if k not in _CLUSTER_KEYS}
        self._backend: Any = None
        self._lock = asyncio.Lock()
        delay = _exit_delay_s(config, datetime.now(UTC))
        if delay is not None:
            # A timer thread, started again by every restart: an asyncio task could not end the
            # actor for good, and no call may ever come to run one.
            timer = threading.Timer(delay, _kill_self)
            timer.daemon = True
            timer.start()

    async def _ready(self) -> Any:
        if self._backend is None:
            async with self._lock:
                if self._backend is None:
                    from airlock.backends.local import LocalBackend

                    backend = LocalBackend.from_config(self._config)
                    await backend.start()
                    self._backend = backend
        return self._backend

    async def describe(self) -> dict[str, Any]:
        """Load the weights if needed; return what the gateway must know (capabilities, where it runs)."""
        import ray

        backend = await self._ready()
        return {
            "supports_logprobs": bool(backend.supports_logprobs),
            "supports_echo": bool(backend.supports_echo),
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
        }

    async def ping(self) -> None:
        """Answer at once: the cost of one call to the actor (benchmarks, liveness)."""

    async def _target(self, adapter: tuple[str, str] | None) -> Any:
        backend = await self._ready()
        if adapter is None:
            return backend
        name, path = adapter
        # A restarted worker has lost its adapters: each call names its adapter's path to load it again.
        if name not in backend.adapters:
            await backend.load_adapter(name, Path(path))
        return backend.adapter_view(name)

    async def call(self, method: str, request: Any, adapter: tuple[str, str] | None = None) -> Any:
        """Run one non-streaming call (``chat``, ``complete``, ``tokenize``, ``detokenize``, ``tokenizer_info``)."""
        target = await self._target(adapter)
        if method == "tokenizer_info":
            return await target.tokenizer_info()
        if method in ("chat", "complete"):
            target.check_request(request)
        return await getattr(target, method)(request)

    async def stream(self, method: str, request: Any, adapter: tuple[str, str] | None = None) -> AsyncIterator[Any]:
        """Yield the chunks of a streaming call (``chat_stream`` or ``complete_stream``) as they are produced."""
        target = await self._target(adapter)
        target.check_request(request)
        async for chunk in getattr(target, method)(request):
            yield chunk

    async def run_job(self, runner: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
        """Run a job on this node, next to these weights: ``runner(*args, backend=...)`` on its own thread."""
        backend = await self._ready()
        return await asyncio.to_thread(runner, *args, backend=backend)


def model_worker(config: dict[str, Any]) -> Any:
    """Return the handle of the model worker for ``config``, creating it where its weights are if none runs.

    The actor is named and detached: every gateway replica shares it, and Ray restarts it (on any
    node holding the weights) when it dies. In-flight calls are not retried: a generation is not
    idempotent, so they fail and the client retries. A noised copy's worker ends at its expiry.
    """
    import ray

    actor_cls = ray.remote(ModelWorkerActor)
    return actor_cls.options(  # type: ignore[attr-defined]
        name=worker_name(config),
        get_if_exists=True,
        lifetime="detached",
        max_restarts=-1,
        max_task_retries=0,
        max_concurrency=256,
        **placement_of(config).options(),
    ).remote(config)


def _unavailable(exc: BaseException) -> BackendUnavailableError:
    return BackendUnavailableError(
        f"the model worker is restarting ({type(exc).__name__}); retry shortly",
        code="model_worker_unavailable",
        retry_after=RETRY_AFTER_S,
    )


def _reraise(exc: BaseException) -> BaseException:
    """Map an exception out of Ray to what the gateway answers: the backend's own error, else a 502 or a 503."""
    import ray.exceptions

    if isinstance(exc, ray.exceptions.RayTaskError):
        cause = exc.cause
        if isinstance(cause, AirlockError):
            return cause
        return BackendError(f"the model worker failed: {type(cause).__name__}: {cause}")
    if isinstance(exc, ray.exceptions.RayError):
        return _unavailable(exc)
    return exc


class RayModelBackend(ModelBackend):
    """A local-weights backend served by a :class:`ModelWorkerActor` on the cluster; the gateway holds no weights."""

    kind = "local"

    def __init__(
        self,
        config: dict[str, Any],
        settings: Settings,
        *,
        adapter: str | None = None,
        adapter_paths: dict[str, str] | None = None,
        handle: Any = None,
    ) -> None:
        self.config = dict(config)
        self.settings = settings
        self._adapter = adapter
        self._adapter_paths: dict[str, str] = adapter_paths if adapter_paths is not None else {}
        self._handle = handle
        self.worker: dict[str, Any] = {}
        self.noise_copy = is_noise_copy(self.config)

    async def start(self) -> None:
        """Join the cluster, find or place the model worker and wait until its weights are loaded."""
        await asyncio.to_thread(connect, self.settings)
        self._handle = model_worker(self.config)
        try:
            self.worker = await self._handle.describe.remote()
        except Exception as exc:
            raise _reraise(exc) from None
        self.supports_logprobs = bool(self.worker["supports_logprobs"])
        self.supports_echo = bool(self.worker["supports_echo"])

    async def aclose(self) -> None:
        """Forget the worker, which stays up: other gateway replicas share it (noised copies end at expiry)."""

    async def retire(self) -> None:
        """Kill a noised copy's worker for good (no restart, its name freed); a base variant's worker stays.

        Another replica may have killed it first, or may still call it: a dead worker is no error here,
        and a replica whose copy was killed under it places a new one on its next call (:meth:`_worker`).
        """
        handle, self._handle = self._handle, None
        if not self.noise_copy or handle is None:
            return
        import ray

        name = worker_name(self.config)
        try:
            await asyncio.to_thread(ray.kill, handle, no_restart=True)
        except Exception:  # already gone, or the cluster unreachable: its own timer ends it at expiry
            log.warning("could not kill noised model worker %s; it exits on its own after expiry", name, exc_info=True)
            return
        log.info("killed noised model worker %s (job %s)", name, self.config.get("noise_job"))

    @property
    def handle(self) -> Any:
        """The Ray actor handle of the model worker."""
        return self._handle

    def _adapter_arg(self) -> tuple[str, str] | None:
        return None if self._adapter is None else (self._adapter, self._adapter_paths[self._adapter])

    async def _worker(self) -> Any:
        """Return the worker's handle, finding or placing the worker again if a noised copy's was killed."""
        if self._handle is None:
            await self.start()
        return self._handle

    def _lost(self, exc: BaseException) -> BaseException:
        """Map an exception out of Ray; a noised copy whose worker died for good is looked up again next call."""
        import ray.exceptions

        if self.noise_copy and isinstance(exc, ray.exceptions.ActorDiedError):
            # Another replica retired it (evicted, or at expiry): a still-live id places it again.
            self._handle = None
        return _reraise(exc)

    async def _call(self, method: str, request: Any) -> Any:
        handle = await self._worker()
        try:
            return await handle.call.remote(method, request, self._adapter_arg())
        except Exception as exc:
            raise self._lost(exc) from None

    async def _stream(self, method: str, request: Any) -> AsyncIterator[Any]:
        handle = await self._worker()
        try:
            async for ref in handle.stream.remote(method, request, self._adapter_arg()):
                yield await ref
        except Exception as exc:
            raise self._lost(exc) from None

    async def chat(self, request: ChatCompletionRequest) -> ChatCompletion:
        """Return a chat completion computed by the model worker."""
        result: ChatCompletion = await self._call("chat", request)
        return result

    def chat_stream(self, request: ChatCompletionRequest) -> AsyncIterator[ChatCompletionChunk]:
        """Yield the model worker's chat chunks as it produces them."""
        return self._stream("chat_stream", request)

    async def complete(self, request: CompletionRequest) -> Completion:
        """Return a text completion computed by the model worker."""
        result: Completion = await self._call("complete", request)
        return result

    def complete_stream(self, request: CompletionRequest) -> AsyncIterator[Completion]:
        """Yield the model worker's completion chunks as it produces them."""
        return self._stream("complete_stream", request)

    async def tokenize(self, request: TokenizeRequest) -> TokenizeResponse:
        """Tokenize with the worker's tokenizer."""
        result: TokenizeResponse = await self._call("tokenize", request)
        return result

    async def detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        """Detokenize with the worker's tokenizer."""
        result: DetokenizeResponse = await self._call("detokenize", request)
        return result

    async def tokenizer_info(self) -> dict[str, Any]:
        """Describe the worker's tokenizer."""
        result: dict[str, Any] = await self._call("tokenizer_info", None)
        return result

    @property
    def adapters(self) -> tuple[str, ...]:
        """Names of the adapters this gateway has asked the worker to serve."""
        return tuple(self._adapter_paths)

    async def load_adapter(self, name: str, path: Path) -> None:
        """Load adapter ``name`` on the worker from ``path`` in the artifact store (every node reaches it)."""
        self._adapter_paths[name] = str(path)
        try:
            await self._handle.call.remote("tokenizer_info", None, (name, str(path)))
        except Exception as exc:
            self._adapter_paths.pop(name, None)
            raise _reraise(exc) from None

    def adapter_view(self, name: str) -> RayModelBackend:
        """Return a backend whose requests run on the worker with adapter ``name``."""
        view = RayModelBackend(
            self.config, self.settings, adapter=name, adapter_paths=self._adapter_paths, handle=self._handle
        )
        view.worker = self.worker
        view.supports_logprobs, view.supports_echo = self.supports_logprobs, self.supports_echo
        return view
