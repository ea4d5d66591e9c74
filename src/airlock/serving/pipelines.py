"""Variant pipelines: each variant's backend wrapped in its mitigations, built on first use and shared."""

from __future__ import annotations

from pathlib import Path

from airlock.backends.pool import BackendPool, VariantRuntimeSpec
from airlock.mitigations.pipeline import VariantPipeline, build_pipeline

__all__ = ["PipelineCache"]


class PipelineCache:
    """Builds and caches the mitigation pipeline of each variant over the backends of a pool."""

    def __init__(self, pool: BackendPool) -> None:
        self.pool = pool
        self._pipelines: dict[str, VariantPipeline] = {}

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

    def clear(self) -> None:
        """Forget every pipeline (their backends belong to the pool)."""
        self._pipelines.clear()
