"""The red-teaming terms of a grant: how many hours of active session time each red-teamer may spend."""

from __future__ import annotations

from airlock.access.models import Grant

__all__ = ["DEFAULT_REDTEAM_HOURS", "redteam_hours"]

DEFAULT_REDTEAM_HOURS = 10.0


def redteam_hours(grant: Grant) -> float:
    """Return the hours of active session time each red-teamer (API key) of ``grant`` may spend."""
    return DEFAULT_REDTEAM_HOURS
