"""HTTP routes of the ledger package."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
