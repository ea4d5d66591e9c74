"""The interpretability terms of a grant: sandbox CPU, result and served-information budgets, full logits."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, PositiveFloat, PositiveInt

from airlock.access.terms import Terms, register_terms

__all__ = ["InterpTerms"]


@register_terms
class InterpTerms(Terms):
    """What remote interpretability may use and return (None: unlimited, or relative to the model's size)."""

    section: ClassVar[str] = "interp"
    # A capability, like a scope: whether interp may return full-vocabulary logits is public.
    public_terms: ClassVar[tuple[str, ...]] = ("interp_full_logits",)
    ledger_quota_names: ClassVar[dict[str, str]] = {
        "quota_interp_cpu_seconds": "interp_cpu_seconds",
        "quota_result_bytes": "result_bytes",
        "quota_interp_served_bytes": "interp_served_bytes",
        "interp_review_served_bytes": "interp_review_served_bytes",
    }

    quota_interp_cpu_seconds: PositiveFloat | None = Field(
        default=None, description="Sandbox CPU-seconds for remote interpretability jobs."
    )
    quota_result_bytes: PositiveInt | None = Field(default=None, description="Bytes of interpretability results.")
    interp_full_logits: bool = Field(
        default=False,
        description="Interp may return full-vocabulary logits (otherwise top-k plus requested token ids only).",
    )
    quota_interp_served_bytes: PositiveInt | None = Field(
        default=None,
        description="Activation, logit and text bytes all interp jobs may be served; default relative to the model.",
    )
    interp_review_served_bytes: PositiveInt | None = Field(
        default=None,
        description="Served bytes past which interp results wait for review; default relative to the model.",
    )
