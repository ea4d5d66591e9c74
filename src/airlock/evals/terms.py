"""The publication terms of a grant: how long after deployment its results stay under embargo."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, NonNegativeInt

from airlock.access.terms import Terms, register_terms

__all__ = ["PublicationTerms"]


@register_terms
class PublicationTerms(Terms):
    """The embargo on publishing a grant's results (None: open-ended, until the lab releases them)."""

    section: ClassVar[str] = "publication"
    public_terms: ClassVar[tuple[str, ...]] = ("embargo_days",)

    embargo_days: NonNegativeInt | None = Field(default=None, description="Publication embargo after deployment.")
