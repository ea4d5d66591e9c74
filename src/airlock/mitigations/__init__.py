"""Mitigations: what a variant declares, the classifiers its filters use, and the pipeline that applies them.

The pipeline wraps a model backend and returns every verdict to its caller (no hidden channel).
"""

from airlock.mitigations.kinds import (
    DEFAULT_REFUSAL,
    Mitigation,
    Verdict,
    build_mitigation,
    check_manifest,
    mitigation_kinds,
    register_mitigation,
)
from airlock.mitigations.pipeline import Mitigated, MitigatedStream, VariantPipeline, build_pipeline

__all__ = [
    "DEFAULT_REFUSAL",
    "Mitigated",
    "MitigatedStream",
    "Mitigation",
    "VariantPipeline",
    "Verdict",
    "build_mitigation",
    "build_pipeline",
    "check_manifest",
    "mitigation_kinds",
    "pipeline",
    "register_mitigation",
]
