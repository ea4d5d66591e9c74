"""Registry tables: models, versions (by weights hash and stage), variants and their mitigations."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from airlock.db import Base, new_id, utcnow

STAGES = ("training-checkpoint", "internal", "external-candidate", "deployed")
STANCES = ("disabled_for_eval", "claimed")


class Model(Base):
    """A model family (e.g. ``smollm2-135m``)."""

    __tablename__ = "models"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("mdl"))
    name: Mapped[str] = mapped_column(String(100), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    versions: Mapped[list[ModelVersion]] = relationship(
        back_populates="model", order_by="ModelVersion.created_at", cascade="all, delete-orphan"
    )


class ModelVersion(Base):
    """One set of weights of a model, identified by a content hash, at a lifecycle stage."""

    __tablename__ = "model_versions"
    __table_args__ = (
        UniqueConstraint("model_id", "label", name="uq_version_label"),
        UniqueConstraint("model_id", "content_hash", name="uq_version_hash"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("ver"))
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    label: Mapped[str] = mapped_column(String(100))
    content_hash: Mapped[str] = mapped_column(String(64))
    stage: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    stage_changed_at: Mapped[datetime] = mapped_column(default=utcnow)

    model: Mapped[Model] = relationship(back_populates="versions")
    variants: Mapped[list[Variant]] = relationship(
        back_populates="version", order_by="Variant.name", cascade="all, delete-orphan"
    )


class StageChange(Base):
    """History of a version's stage transitions (who, when, from, to)."""

    __tablename__ = "stage_changes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    version_id: Mapped[str] = mapped_column(ForeignKey("model_versions.id", ondelete="CASCADE"), index=True)
    from_stage: Mapped[str | None] = mapped_column(String(32))
    to_stage: Mapped[str] = mapped_column(String(32))
    actor: Mapped[str] = mapped_column(String(100))
    at: Mapped[datetime] = mapped_column(default=utcnow)


class Variant(Base):
    """A deployment protocol of a version (``production``, ``helpful-only``, ``base``, ...)."""

    __tablename__ = "variants"
    __table_args__ = (UniqueConstraint("version_id", "name", name="uq_variant_name"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("var"))
    version_id: Mapped[str] = mapped_column(ForeignKey("model_versions.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    description: Mapped[str] = mapped_column(Text, default="")
    backend: Mapped[str] = mapped_column(String(50))
    backend_config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # The manifest's cap on tokens per choice; NULL: derived from the backend (see ResolvedVariant).
    max_output_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    version: Mapped[ModelVersion] = relationship(back_populates="variants")
    mitigations: Mapped[list[Mitigation]] = relationship(
        back_populates="variant", order_by="Mitigation.position", cascade="all, delete-orphan"
    )


class Mitigation(Base):
    """One mitigation of a variant, applied in ``position`` order, with its evaluator stance."""

    __tablename__ = "mitigations"
    __table_args__ = (UniqueConstraint("variant_id", "name", name="uq_mitigation_name"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("mit"))
    variant_id: Mapped[str] = mapped_column(ForeignKey("variants.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(100))
    kind: Mapped[str] = mapped_column(String(50))
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    stance: Mapped[str | None] = mapped_column(String(32), nullable=True)

    variant: Mapped[Variant] = relationship(back_populates="mitigations")
