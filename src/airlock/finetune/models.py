"""Fine-tuning tables: uploaded training files (bytes live under the data dir)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, ForeignKey, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from airlock.db import Base, utcnow


class TrainingFile(Base):
    """A file an evaluator uploaded; its bytes are at ``<home>/files/<id>.jsonl``."""

    __tablename__ = "files"
    __table_args__ = (Index("ix_files_evaluator_created", "evaluator_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(48), primary_key=True)
    evaluator_id: Mapped[str] = mapped_column(ForeignKey("evaluators.id"))
    grant_id: Mapped[str] = mapped_column(ForeignKey("grants.id"), index=True)
    filename: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    examples: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
