"""HTTP routes of the governance package."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
