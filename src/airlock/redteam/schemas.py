"""Request and response bodies of the red-teaming API."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from airlock.redteam.models import RedteamFinding, RedteamSession, RedteamTurn
from airlock.redteam.service import Hours

Category = Literal["bio", "chem", "cyber", "autonomy", "persuasion", "other"]
Severity = Literal["low", "medium", "high", "critical"]


class SessionCreate(BaseModel):
    """Open a session with one granted model id, or two side by side (the same prompt goes to both)."""

    models: list[str] = Field(min_length=1, max_length=2, description="One or two model ids of your grant.")
    title: str = Field(default="", max_length=200)


class TurnCreate(BaseModel):
    """One prompt, sent to every variant of the session."""

    content: str = Field(min_length=1, max_length=20_000)
    max_tokens: int | None = Field(default=None, ge=1)
    stream: bool = Field(default=False, description="Stream the answers as server-sent events.")


class ResponsePublic(BaseModel):
    """One variant's answer to a turn."""

    variant: str
    content: str
    blocked: bool
    finish_reason: str | None = None


class TurnPublic(BaseModel):
    """One turn of the transcript."""

    index: int
    prompt: str
    responses: list[ResponsePublic]
    active_seconds: float
    created_at: datetime

    @classmethod
    def of(cls, row: RedteamTurn) -> TurnPublic:
        """Build the view of a stored turn."""
        return cls(
            index=row.index,
            prompt=row.prompt,
            responses=[ResponsePublic.model_validate(r) for r in row.responses],
            active_seconds=row.active_seconds,
            created_at=row.created_at,
        )


class HoursPublic(BaseModel):
    """A red-teamer's hour budget on the grant."""

    granted: float
    used: float
    left: float

    @classmethod
    def of(cls, hours: Hours) -> HoursPublic:
        """Build the view, rounded to the second."""
        return cls(granted=hours.granted, used=round(hours.used, 4), left=round(hours.left, 4))


class SessionPublic(BaseModel):
    """A red-teaming session (with its transcript when asked for one session)."""

    id: str
    models: list[str]
    variants: list[str]
    title: str
    status: str
    turns: int
    active_hours: float
    created_at: datetime
    closed_at: datetime | None
    transcript: list[TurnPublic] | None = None

    @classmethod
    def of(cls, row: RedteamSession, turns: list[RedteamTurn] | None = None) -> SessionPublic:
        """Build the view of a session row."""
        return cls(
            id=row.id,
            models=list(row.targets),
            variants=list(row.variants),
            title=row.title,
            status=row.status,
            turns=row.turns,
            active_hours=round(row.active_seconds / 3600, 4),
            created_at=row.created_at,
            closed_at=row.closed_at,
            transcript=[TurnPublic.of(t) for t in turns] if turns is not None else None,
        )


class FindingCreate(BaseModel):
    """Flag one variant's answer to one turn."""

    turn: int = Field(ge=0, description="The turn's index in the session's transcript.")
    variant: str | None = Field(default=None, description="Which variant's answer (default: the session's first).")
    category: Category
    severity: Severity
    title: str = Field(min_length=1, max_length=200)
    notes: str = Field(default="", max_length=20_000, description="How to reproduce it.")


class TriageRequest(BaseModel):
    """The lab's triage of a finding."""

    status: Literal["acknowledged", "disputed", "fixed"]
    reason: str = Field(default="", max_length=10_000, description="Required for a dispute.")
    fixed_in: str | None = Field(default=None, description="For `fixed`: the label of the later version that fixes it.")


class FindingPublic(BaseModel):
    """A finding and its triage."""

    id: str
    session_id: str
    turn: int
    grant_id: str
    evaluator_id: str
    version_id: str
    variant: str
    category: str
    severity: str
    title: str
    notes: str
    status: str
    triage_reason: str
    fixed_in_version_id: str | None
    triaged_by: str | None
    triaged_at: datetime | None
    created_at: datetime

    @classmethod
    def of(cls, row: RedteamFinding) -> FindingPublic:
        """Build the view of a finding row."""
        data: dict[str, Any] = {name: getattr(row, name) for name in cls.model_fields if name != "turn"}
        return cls(turn=row.turn_index, **data)
