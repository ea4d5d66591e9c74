"""The red-teaming terms of a grant: how many hours of active session time each red-teamer may spend."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, PositiveFloat

from airlock.access.models import Grant
from airlock.access.terms import Terms, register_terms, terms_of

__all__ = ["DEFAULT_REDTEAM_HOURS", "RedteamTerms", "redteam_hours"]

DEFAULT_REDTEAM_HOURS = 10.0


@register_terms
class RedteamTerms(Terms):
    """Hours of active red-teaming per red-teamer (API key); None: the default of 10 hours."""

    section: ClassVar[str] = "redteam"
    ledger_quota_names: ClassVar[dict[str, str]] = {"redteam_hours": "redteam_hours"}

    redteam_hours: PositiveFloat | None = Field(
        default=None, description=f"Hours of active session time per red-teamer (default {DEFAULT_REDTEAM_HOURS:g})."
    )


def redteam_hours(grant: Grant) -> float:
    """Return the hours of active session time each red-teamer (API key) of ``grant`` may spend."""
    hours = terms_of(grant, RedteamTerms).redteam_hours
    return DEFAULT_REDTEAM_HOURS if hours is None else hours
