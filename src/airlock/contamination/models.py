"""Contamination tables: evaluators' registered fingerprints, the lab's checks, and the items each check found."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, Float, ForeignKey, Integer, LargeBinary, String
from sqlalchemy.orm import Mapped, mapped_column

from airlock.db import Base, new_id, utcnow


class ContaminationRegistration(Base):
    """One fingerprinted test set of an evaluator organisation: salt, scheme, per-item shingle hashes."""

    __tablename__ = "contamination_registrations"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("ctr"))
    evaluator_id: Mapped[str] = mapped_column(ForeignKey("evaluators.id"), index=True)
    grant_id: Mapped[str] = mapped_column(ForeignKey("grants.id"))
    key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"))
    name: Mapped[str] = mapped_column(String(200), default="")
    salt: Mapped[str] = mapped_column(String(256))
    ngram: Mapped[int] = mapped_column(Integer)
    threshold: Mapped[float] = mapped_column(Float)
    min_shingles: Mapped[int] = mapped_column(Integer)
    item_count: Mapped[int] = mapped_column(Integer)
    shingle_count: Mapped[int] = mapped_column(Integer)
    skipped: Mapped[int] = mapped_column(Integer, default=0)
    digest: Mapped[str] = mapped_column(String(64))
    """SHA-256 of the uploaded fingerprint's canonical JSON (the ledger names the registration by it)."""
    item_ids: Mapped[list[str]] = mapped_column(JSON(), default=list)
    sizes: Mapped[bytes] = mapped_column(LargeBinary)
    """Each item's shingle count, little-endian uint32."""
    hashes: Mapped[bytes] = mapped_column(LargeBinary)
    """Every item's sorted shingle hashes, concatenated in item order, little-endian uint32."""
    status: Mapped[str] = mapped_column(String(16), default="active")  # active | withdrawn
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    withdrawn_at: Mapped[datetime | None] = mapped_column(nullable=True)


class ContaminationCheck(Base):
    """One check of a lab corpus against the registrations active when it was opened."""

    __tablename__ = "contamination_checks"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("ctc"))
    actor: Mapped[str] = mapped_column(String(200))
    role: Mapped[str] = mapped_column(String(40))
    token_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    corpus: Mapped[str] = mapped_column(String(200), default="")
    registrations: Mapped[list[str]] = mapped_column(JSON(), default=list)
    status: Mapped[str] = mapped_column(String(16), default="open")  # open | completed
    documents: Mapped[int | None] = mapped_column(Integer, nullable=True)
    matched_documents: Mapped[int | None] = mapped_column(Integer, nullable=True)
    corpus_digest: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column(nullable=True)


class ContaminationHit(Base):
    """One registered item a completed check found in the corpus: in how many documents, how fully."""

    __tablename__ = "contamination_hits"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("cth"))
    check_id: Mapped[str] = mapped_column(ForeignKey("contamination_checks.id"), index=True)
    registration_id: Mapped[str] = mapped_column(ForeignKey("contamination_registrations.id"), index=True)
    item_id: Mapped[str] = mapped_column(String(200))
    documents: Mapped[int] = mapped_column(Integer)
    max_fraction: Mapped[float] = mapped_column(Float)
