"""HTTP routes of the publish package."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
