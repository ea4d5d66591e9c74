"""The fine-tuning terms of a grant: how many jobs it may start, tokens train on, and training-file bytes hold."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, PositiveInt

from airlock.access.terms import Terms, register_terms

__all__ = ["FinetuneTerms"]


@register_terms
class FinetuneTerms(Terms):
    """Quotas of lab-side fine-tuning (None: unlimited)."""

    section: ClassVar[str] = "finetune"
    ledger_quota_names: ClassVar[dict[str, str]] = {
        "quota_finetune_jobs": "finetune_jobs",
        "quota_trained_tokens": "trained_tokens",
        "quota_file_bytes": "file_bytes",
    }

    quota_finetune_jobs: PositiveInt | None = Field(default=None, description="Fine-tuning jobs the grant may start.")
    quota_trained_tokens: PositiveInt | None = Field(default=None, description="Tokens all its jobs may train on.")
    quota_file_bytes: PositiveInt | None = Field(default=None, description="Bytes of training files it may hold.")
