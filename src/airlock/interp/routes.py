"""HTTP routes of the interp package."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
