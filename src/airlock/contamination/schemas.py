"""Request and response bodies of the contamination API."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from airlock.contamination.models import ContaminationCheck, ContaminationRegistration
from airlock.contamination.service import ItemHit


class ItemUpload(BaseModel):
    """One fingerprinted test item: an opaque id and its shingle hashes."""

    model_config = ConfigDict(strict=True)  # a boolean is not a count

    id: str = Field(min_length=1, max_length=200, description="The evaluator's id for the item (opaque to the lab).")
    shingles: str = Field(min_length=1, description="Sorted distinct uint32 shingle hashes, little-endian, base64.")


class FingerprintUpload(BaseModel):
    """A fingerprint file as `airlock contamination fingerprint` writes it."""

    model_config = ConfigDict(strict=True)  # a boolean is not a count

    format: str = Field(description="airlock-contamination-fingerprint/1")
    name: str = Field(default="", max_length=200, description="A label for the test set (committed in the ledger).")
    salt: str = Field(min_length=32, max_length=256, description="The registration's random salt, hex.")
    scheme: dict[str, Any] = Field(description="Normalisation, hash, shingle length and matching rule.")
    skipped: int = Field(default=0, ge=0, description="Items too short to fingerprint.")
    items: list[ItemUpload] = Field(min_length=1)


class ItemHitPublic(BaseModel):
    """A registered item that a lab check found in its corpus."""

    item: str
    documents: int
    max_fraction: float

    @classmethod
    def of(cls, hit: ItemHit) -> ItemHitPublic:
        """Build the view of one hit."""
        return cls(item=hit.item, documents=hit.documents, max_fraction=hit.max_fraction)


class RegistrationPublic(BaseModel):
    """A registered test set as its organisation sees it (no hashes), with the items checks found."""

    id: str
    name: str
    status: str
    grant_id: str
    items: int
    shingles: int
    skipped: int
    ngram: int
    threshold: float
    min_shingles: int
    digest: str
    created_at: datetime
    withdrawn_at: datetime | None = None
    checks: int = Field(description="Completed lab checks this registration took part in.")
    found: list[ItemHitPublic] = Field(default_factory=list, description="Items found by those checks.")

    @classmethod
    def of(
        cls, row: ContaminationRegistration, checks: int = 0, hits: list[ItemHit] | None = None
    ) -> RegistrationPublic:
        """Build the view of a stored registration."""
        return cls(
            id=row.id,
            name=row.name,
            status=row.status,
            grant_id=row.grant_id,
            items=row.item_count,
            shingles=row.shingle_count,
            skipped=row.skipped,
            ngram=row.ngram,
            threshold=row.threshold,
            min_shingles=row.min_shingles,
            digest=row.digest,
            created_at=row.created_at,
            withdrawn_at=row.withdrawn_at,
            checks=checks,
            found=[ItemHitPublic.of(h) for h in hits or []],
        )


class CheckOpen(BaseModel):
    """Open a check of a corpus against every active registration."""

    model_config = ConfigDict(strict=True)  # a boolean is not a count

    corpus: str = Field(default="", max_length=200, description="A label for the corpus (committed in the ledger).")


class CheckPublic(BaseModel):
    """A check as the lab sees it."""

    id: str
    actor: str
    role: str
    corpus: str
    status: str
    registrations: list[str]
    documents: int | None = None
    matched_documents: int | None = None
    corpus_digest: str | None = None
    created_at: datetime
    completed_at: datetime | None = None

    @classmethod
    def of(cls, row: ContaminationCheck) -> CheckPublic:
        """Build the view of a stored check."""
        return cls(
            id=row.id,
            actor=row.actor,
            role=row.role,
            corpus=row.corpus,
            status=row.status,
            registrations=list(row.registrations),
            documents=row.documents,
            matched_documents=row.matched_documents,
            corpus_digest=row.corpus_digest,
            created_at=row.created_at,
            completed_at=row.completed_at,
        )


class CheckOpened(BaseModel):
    """An opened check and the fingerprints to check the corpus against (each with its registration id)."""

    check: CheckPublic
    fingerprints: list[dict[str, Any]] = Field(description="Fingerprint files, each with an added `registration`.")


class HitReport(BaseModel):
    """One item the check found: in how many documents, and the best fraction of its shingles."""

    model_config = ConfigDict(strict=True)  # a boolean is not a count

    registration: str = Field(min_length=1, max_length=40)
    item: str = Field(min_length=1, max_length=200)
    documents: int = Field(ge=1)
    max_fraction: float = Field(gt=0, le=1)


class CheckReport(BaseModel):
    """A finished check's outcome: counts and found items, never document text."""

    model_config = ConfigDict(strict=True)  # a boolean is not a count

    documents: int = Field(ge=0)
    matched_documents: int = Field(ge=0)
    corpus_digest: str = Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the corpus bytes read.")
    hits: list[HitReport] = Field(default_factory=list)
