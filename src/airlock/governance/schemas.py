"""Wire schemas of the gate API: promotion requests, decisions and overrides leaving the API."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from airlock.governance.models import GateDecision, Override

TargetStage = Literal["training-checkpoint", "internal", "external-candidate", "deployed"]
GateStage = Literal["internal", "external-candidate", "deployed"]


class OverrideBody(BaseModel):
    """A decider's override of a blocking gate; the caller's admin token must have the decider role."""

    model_config = ConfigDict(extra="forbid")
    justification: str = Field(min_length=1, max_length=10_000, description="Why deploying anyway is acceptable.")


class PromoteRequest(BaseModel):
    """Move a version to another stage, through the gate when the policy gates that stage."""

    model_config = ConfigDict(extra="forbid")
    stage: TargetStage
    override: OverrideBody | None = Field(default=None, description="Only needed when the gate blocks.")


class OverridePublic(BaseModel):
    """A recorded override."""

    id: str
    decision_id: str
    stage: str
    decider: str
    decider_role: str
    justification: str
    blocking: list[str]
    created_at: datetime

    @classmethod
    def of(cls, row: Override) -> OverridePublic:
        """Build from a row."""
        return cls.model_validate(row, from_attributes=True)


class DecisionPublic(BaseModel):
    """A gate decision taken at a promotion attempt (the report is fetched separately)."""

    id: str
    from_stage: str
    stage: str
    decision: str
    promoted: bool
    actor: str
    report_sha256: str
    policy_sha256: str
    blocking: list[str]
    created_at: datetime
    override: OverridePublic | None = None

    @classmethod
    def of(cls, row: GateDecision, override: Override | None = None) -> DecisionPublic:
        """Build from a row and its override."""
        return cls(
            id=row.id,
            from_stage=row.from_stage,
            stage=row.stage,
            decision=row.decision,
            promoted=row.promoted,
            actor=row.actor,
            report_sha256=row.report_sha256,
            policy_sha256=row.policy_sha256,
            blocking=list(row.report.get("blocking", [])),
            created_at=row.created_at,
            override=OverridePublic.of(override) if override else None,
        )


class PromotionPublic(BaseModel):
    """The outcome of an accepted promotion."""

    model: str
    version: str
    stage: str
    promoted: bool
    message: str
    decision: DecisionPublic | None = None


class PolicyPublic(BaseModel):
    """The policy in force."""

    path: str
    sha256: str
    policy: dict[str, Any]
