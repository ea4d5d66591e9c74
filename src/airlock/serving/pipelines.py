"""Variant pipelines: each variant's backend wrapped in its mitigations, built on first use and shared."""

from __future__ import annotations

from collections import OrderedDict
from datetime import datetime
from pathlib import Path

from airlock.backends.pool import BackendPool, VariantRuntimeSpec
from airlock.db import utcnow
from airlock.errors import InvalidRequestError
from airlock.ids import NoisedRef
from airlock.mitigations.pipeline import VariantPipeline, build_pipeline

__all__ = ["MAX_NOISED_LOADED", "PipelineCache"]

MAX_NOISED_LOADED = 4


class PipelineCache:
    """Builds and caches the mitigation pipeline of each variant over the backends of a pool."""

    def __init__(self, pool: BackendPool) -> None:
        self.pool = pool
        self._pipelines: dict[str, VariantPipeline] = {}
        # Noise-injected variants hold a full copy of the weights each: the most recently used few
        # stay loaded, and each is closed once it expires.
        self._noised: OrderedDict[str, tuple[VariantRuntimeSpec, datetime]] = OrderedDict()
        self.max_noised = MAX_NOISED_LOADED

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
        """Return the variant's pipeline over its own copy of the weights with ``noise`` added on load."""
        if spec.backend != "local":
            raise InvalidRequestError(f"variant {noise.base} is not served from weights the lab can noise")
        noised = VariantRuntimeSpec(
            spec.variant_id,
            spec.backend,
            {**spec.backend_config, "noise_sigma": noise.sigma, "noise_seed": noise.seed},
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
        return pipeline

    async def _retire(self, *, keep: str) -> None:
        """Close noised backends that expired, and the least recently used beyond ``max_noised``."""
        now = utcnow()
        expired = [k for k, (_spec, at) in self._noised.items() if at <= now and k != keep]
        surplus = [k for k in self._noised if k != keep and k not in expired]
        surplus = surplus[: max(0, len(surplus) + 1 - self.max_noised)]
        for key in expired + surplus:
            spec, _at = self._noised.pop(key)
            self._pipelines.pop(key, None)
            await self.pool.discard(spec)

    @property
    def noised_loaded(self) -> int:
        """Return how many noise-injected variants hold weights now."""
        return len(self._noised)

    def clear(self) -> None:
        """Forget every pipeline (their backends belong to the pool)."""
        self._pipelines.clear()
        self._noised.clear()
