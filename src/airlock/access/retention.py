"""Retention terms of a grant: what content the lab may keep after the work is done, per capability.

``none`` keeps metadata only (counts, sizes, hashes, timings, verdicts) once a piece of work is
finished; ``sealed`` keeps content encrypted to the evaluator's seal key, readable by the lab only
item by item as the evaluator releases it (``airlock.access.sealing``, which also holds the one
keep/seal/drop decision every path asks); ``full`` keeps content as the lab always has.
Evaluation capabilities default to ``none``; red-team transcripts, which the lab triages findings
against, default to ``full``.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field
from sqlalchemy.orm import Session

from airlock.access.models import Grant
from airlock.access.seal import GrantIntegrityError, verified_grant
from airlock.access.terms import Terms, register_terms, terms_of

__all__ = ["MODES", "Mode", "RetentionTerms", "grant_keeps_content", "keeps_content"]

Mode = Literal["none", "sealed", "full"]
MODES: tuple[str, ...] = ("none", "sealed", "full")


@register_terms
class RetentionTerms(Terms):
    """Per capability, whether the lab keeps content after the work (``none`` | ``sealed`` | ``full``)."""

    section: ClassVar[str] = "retention"
    public_terms: ClassVar[tuple[str, ...]] = (
        "retention_finetune",
        "retention_interp",
        "retention_evals",
        "retention_redteam",
    )

    retention_finetune: Mode = Field(
        default="none", description="Training-file content and checkpoints after a fine-tuning job ends."
    )
    retention_interp: Mode = Field(default="none", description="Interp job code, logs and results after the job.")
    retention_evals: Mode = Field(
        default="none", description="Evaluation logs sent for attestation: only what the attestation needs."
    )
    retention_redteam: Mode = Field(default="full", description="Red-team transcripts after the session closes.")


def keeps_content(grant: Grant | None, term: str) -> bool:
    """Return whether ``grant`` lets the lab keep content readable under retention term ``term`` (no grant: ``none``).

    ``sealed`` is not readable: a path asks :func:`airlock.access.sealing.disposition` whether to seal.
    """
    if grant is None:
        return False
    return bool(getattr(terms_of(grant, RetentionTerms), term) == "full")


def grant_keeps_content(session: Session, grant_id: str, term: str) -> bool:
    """Return whether the (seal-checked) grant ``grant_id`` lets the lab keep content under ``term``.

    A missing grant or one whose seal fails keeps nothing: on doubt the lab holds less, not more.
    """
    try:
        grant = verified_grant(session, grant_id)
    except GrantIntegrityError:
        return False
    return keeps_content(grant, term)
