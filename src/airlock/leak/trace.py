"""Trace a leaked text to the grant whose watermark it carries: one exact test per grant, ranked by p-value."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from airlock.access.models import Evaluator, Grant
from airlock.access.quotas import SamplingTerms
from airlock.access.terms import terms_of
from airlock.backends.watermark import Detection, detect
from airlock.leak.keys import watermark_key

__all__ = ["GrantMatch", "Tokenizer", "trace_tokens"]


@dataclass(frozen=True)
class GrantMatch:
    """One grant's watermark test against the text."""

    grant_id: str
    evaluator: str
    detection: Detection
    """The test under the tokenization that fitted this grant best."""
    tokenizer: str
    p_adjusted: float
    """``p_value`` times the number of tests run (grants x tokenizations), capped at 1 (Bonferroni)."""


Tokenizer = tuple[str, Sequence[int]]
"""A tokenization of the text: a name (the model it comes from) and its token ids."""


def trace_tokens(session: Session, tokenizations: Sequence[Tokenizer]) -> list[GrantMatch]:
    """Test every watermarked grant (revoked ones too) against each tokenization; most likely first.

    The p-value of a grant is the chance that text carrying no watermark of that grant scores
    as high; the adjusted p-value accounts for testing every grant (and tokenization), so a
    small one attributes the text to that grant.
    """
    every = session.execute(select(Grant, Evaluator.name).join(Evaluator, Grant.evaluator_id == Evaluator.id)).all()
    # A grant whose terms turn watermarking off produced no watermarked text: testing it only dilutes.
    rows = [(grant.id, evaluator) for grant, evaluator in every if terms_of(grant, SamplingTerms).watermark]
    tests = max(1, len(rows) * len(tokenizations))
    matches: list[GrantMatch] = []
    for grant_id, evaluator in rows:
        key = watermark_key(session, grant_id)
        best: tuple[Detection, str] | None = None
        for name, ids in tokenizations:
            found = detect(key, ids)
            if best is None or found.p_value < best[0].p_value:
                best = (found, name)
        if best is None:
            continue
        detection, name = best
        matches.append(GrantMatch(grant_id, evaluator, detection, name, min(1.0, detection.p_value * tests)))
    matches.sort(key=lambda m: (m.detection.p_value, m.grant_id))
    return matches
