"""Tables of evaluator signing keys and attested eval results."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from airlock.db import Base, new_id, utcnow


class SigningKey(Base):
    """An evaluator's Ed25519 public key, registered before results signed with it are accepted."""

    __tablename__ = "signing_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("skey"))
    evaluator_id: Mapped[str] = mapped_column(ForeignKey("evaluators.id"), index=True)
    public_key: Mapped[str] = mapped_column(String(64))
    fingerprint: Mapped[str] = mapped_column(String(64), unique=True)
    registered_by: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(nullable=True)


class EvalResult(Base):
    """A signature-verified eval result tied to a model version, variant and grant."""

    __tablename__ = "eval_results"
    __table_args__ = (
        UniqueConstraint("signature", name="uq_result_signature"),
        UniqueConstraint("evaluator_id", "log_sha256", name="uq_result_log"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("res"))
    evaluator_id: Mapped[str] = mapped_column(ForeignKey("evaluators.id"), index=True)
    grant_id: Mapped[str] = mapped_column(ForeignKey("grants.id"), index=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"), index=True)
    version_id: Mapped[str] = mapped_column(ForeignKey("model_versions.id"), index=True)
    variant: Mapped[str] = mapped_column(String(100))
    suite: Mapped[str | None] = mapped_column(String(100), nullable=True)
    task: Mapped[str] = mapped_column(String(200))
    dataset_hash: Mapped[str] = mapped_column(String(64))
    samples: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    elicitation: Mapped[dict[str, Any]] = mapped_column(default=dict)
    fine_tuned: Mapped[bool] = mapped_column(default=False)
    log_sha256: Mapped[str] = mapped_column(String(64))
    attestation: Mapped[dict[str, Any]] = mapped_column(default=dict)
    signature: Mapped[str] = mapped_column(String(100))
    key_fingerprint: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    notes: Mapped[str] = mapped_column(Text, default="")
