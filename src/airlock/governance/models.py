"""Tables of the governance package."""

from __future__ import annotations

from airlock.db import Base  # noqa: F401
