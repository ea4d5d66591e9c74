"""A grant's sampling terms are parsed once per stored terms object, and again for any other."""

from __future__ import annotations

from airlock.access.models import Grant
from airlock.serving.service import _sampling_terms


def test_terms_follow_the_stored_object() -> None:
    grant = Grant(terms={"quota_requests_per_minute": 7})
    first = _sampling_terms(grant)
    assert first.quota_requests_per_minute == 7 and _sampling_terms(grant) is first
    grant.terms = {"quota_requests_per_minute": 9, "watermark": False}  # amended: a new object
    amended = _sampling_terms(grant)
    assert amended.quota_requests_per_minute == 9 and amended.watermark is False
    assert _sampling_terms(Grant(terms={})).quota_requests_per_minute is None
