"""Variant pipelines: each variant's backend wrapped in its mitigations, built on first use and shared."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from airlock.backends.pool import BackendPool, VariantRuntimeSpec
from airlock.db import utcnow
from airlock.errors import InvalidRequestError
from airlock.ids import NoisedRef
from airlock.mitigations.pipeline import VariantPipeline, build_pipeline

__all__ = ["MAX_NOISED_LOADED", "MAX_SWEEP_WAIT_S", "NoisedExpiry", "PipelineCache"]

log = logging.getLogger(__name__)

MAX_NOISED_LOADED = 4
#: The longest the expiry sweeper sleeps without looking again: the wall clock it compares expiries
#: with may jump (a suspended host, a clock step), the loop's timer does not follow it.
MAX_SWEEP_WAIT_S = 60.0


class PipelineCache:
    """Builds and caches the mitigation pipeline of each variant over the backends of a pool."""

    def __init__(self, pool: BackendPool, clock: Callable[[], datetime] = utcnow) -> None:
        self.pool = pool
        self.clock = clock
        self._pipelines: dict[str, VariantPipeline] = {}
        # Noise-injected variants hold a full copy of the weights each: the most recently used few
        # stay loaded, and each is closed once it expires (by :class:`NoisedExpiry`, at expiry).
        self._noised: OrderedDict[str, tuple[VariantRuntimeSpec, datetime]] = OrderedDict()
        self.max_noised = MAX_NOISED_LOADED
        self._noised_changed = asyncio.Event()

    async def pipeline(self, spec: VariantRuntimeSpec) -> VariantPipeline:
        """Return the variant's backend wrapped in its mitigations, in order."""
        key = spec.pipeline_key()
        pipeline = self._pipelines.get(key)
        if pipeline is None:
            pipeline = build_pipeline(await self.pool.backend(spec), spec.mitigations)
            self._pipelines[key] = pipeline
        return pipeline

    async def adapter_pipeline(self, spec: VariantRuntimeSpec, name: str, path: Path) -> VariantPipeline:
        """Return the variant's pipeline over its local backend running LoRA adapter ``name``."""
        key = spec.pipeline_key() + ":" + name
        pipeline = self._pipelines.get(key)
        if pipeline is None:
            pipeline = build_pipeline(await self.pool.adapter_backend(spec, name, path), spec.mitigations)
            self._pipelines[key] = pipeline
        return pipeline

    async def noise_pipeline(self, spec: VariantRuntimeSpec, noise: NoisedRef, expires_at: datetime) -> VariantPipeline:
        """Return the variant's pipeline over its own copy of the weights with ``noise`` added on load.

        Each ``(job, sigma, seed)`` is its own copy (on the Ray plane its own model worker), and the
        copy knows when it expires: a Ray worker holding it exits on its own soon after, should no
        gateway be left to stop it.
        """
        if spec.backend != "local":
            raise InvalidRequestError(f"variant {noise.base} is not served from weights the lab can noise")
        noised = VariantRuntimeSpec(
            spec.variant_id,
            spec.backend,
            {
                **spec.backend_config,
                "noise_sigma": noise.sigma,
                "noise_seed": noise.seed,
                "noise_job": noise.job_id,
                "noise_expires_at": expires_at.isoformat(),
            },
            spec.mitigations,
        )
        key = noised.pipeline_key()
        await self._retire(keep=key)
        pipeline = self._pipelines.get(key)
        if pipeline is None:
            pipeline = build_pipeline(await self.pool.backend(noised), spec.mitigations)
            self._pipelines[key] = pipeline
        self._noised[key] = (noised, expires_at)
        self._noised.move_to_end(key)
        self._noised_changed.set()  # the sweeper's next wake-up may now be sooner
        return pipeline

    async def _retire(self, *, keep: str | None = None) -> int:
        """Close expired noised copies and the least recently used beyond ``max_noised``; return how many it closed."""
        now = self.clock()
        expired = [k for k, (_spec, at) in self._noised.items() if at <= now and k != keep]
        surplus = [k for k in self._noised if k != keep and k not in expired]
        surplus = surplus[: max(0, len(surplus) + (keep is not None) - self.max_noised)]
        retired = 0
        for key in expired + surplus:
            entry = self._noised.pop(key, None)
            if entry is None:  # another pass retired it while this one awaited a close
                continue
            spec, at = entry
            retired += 1
            self._pipelines.pop(key, None)
            reason = "expired" if key in expired else "least recently used"
            config = spec.backend_config
            log.info(
                "stopping noise-injected copy of variant %s (job %s, sigma %s, seed %s, expires %s): %s",
                spec.variant_id,
                config.get("noise_job"),
                config.get("noise_sigma"),
                config.get("noise_seed"),
                at.isoformat(),
                reason,
            )
            try:
                await self.pool.discard(spec)
            except Exception:  # the others must still be closed; the copy's id no longer resolves anyway
                log.exception("closing the noise-injected copy of variant %s failed", spec.variant_id)
        return retired

    async def retire_expired(self) -> int:
        """Close every noised backend whose variant has expired by ``clock()``; return how many."""
        return await self._retire()

    def next_expiry(self) -> datetime | None:
        """Return when the next loaded noised variant expires (None when none is loaded)."""
        return min((at for _spec, at in self._noised.values()), default=None)

    async def wait_for_noised_change(self, timeout: float | None) -> None:
        """Wait until a noised variant is loaded (or its expiry moves), or ``timeout`` seconds pass."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._noised_changed.wait(), timeout)
        self._noised_changed.clear()

    def poke(self) -> None:
        """Make the sweeper look again now (the clock was moved); call on the loop the cache serves on."""
        self._noised_changed.set()

    def new_wakeup(self) -> None:
        """Start the sweeper's wake-ups afresh: an event bound to one loop cannot serve another (an app restarted)."""
        self._noised_changed = asyncio.Event()

    @property
    def noised_loaded(self) -> int:
        """Return how many noise-injected variants hold weights now."""
        return len(self._noised)

    def clear(self) -> None:
        """Forget every pipeline (their backends belong to the pool)."""
        self._pipelines.clear()
        self._noised.clear()


class NoisedExpiry:
    """Closes each noise-injected variant's backend at its expiry, whether or not another request comes.

    One asyncio task on the gateway's loop (the pool's backends live there): it sleeps until the
    next loaded variant expires, or until a variant is loaded, never on a fixed poll. On the Ray
    plane closing the backend kills the variant's model worker (:class:`~airlock.cluster.worker.RayModelBackend`).
    """

    def __init__(self, pipelines: PipelineCache, max_wait_s: float = MAX_SWEEP_WAIT_S) -> None:
        self.pipelines = pipelines
        self.max_wait_s = max_wait_s
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        """Start the sweeper on the running loop (idempotent)."""
        if self._task is None:
            self._loop = asyncio.get_running_loop()
            self.pipelines.new_wakeup()
            self._task = asyncio.create_task(self._run(), name="noised-expiry")

    async def stop(self) -> None:
        """Cancel the sweeper and wait for it to end (a close in progress is cancelled with it)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def poke(self) -> None:
        """Make the sweeper look again at once; safe from any thread (tests move the cache's clock)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.pipelines.poke)

    def wait_s(self) -> float | None:
        """Return how long to sleep before the next pass: until the next expiry, at most ``max_wait_s``."""
        upcoming = self.pipelines.next_expiry()
        if upcoming is None:
            return None
        return min(self.max_wait_s, max(0.0, (upcoming - self.pipelines.clock()).total_seconds()))

    async def _run(self) -> None:
        while True:
            try:
                await self.pipelines.retire_expired()
            except Exception:  # never let one failed pass stop the expiry of the others
                log.exception("noised-expiry: pass failed; the next one retries")
            await self.pipelines.wait_for_noised_change(self.wait_s())
