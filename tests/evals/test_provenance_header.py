"""Provenance in the log header (eval-level metadata) is read without samples (``--no-log-samples``)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from airlock.evals.provider import provenance_from_log


def test_provenance_is_read_from_the_header_of_a_log_without_samples() -> None:
    record = {"variant": {"grant_id": "grant_x", "version": "v1", "version_hash": "a" * 64, "variant": "helpful-only"}}
    log = SimpleNamespace(
        eval=SimpleNamespace(
            model="airlock/m1/helpful-only", metadata={"airlock": {"airlock/m1/helpful-only": record}}
        ),
        samples=None,
    )
    assert provenance_from_log(log) == record  # type: ignore[arg-type]


def test_a_header_for_another_model_is_not_taken() -> None:
    log = SimpleNamespace(
        eval=SimpleNamespace(model="airlock/m1/production", metadata={"airlock": {"airlock/m1/helpful-only": {}}}),
        samples=None,
    )
    with pytest.raises(ValueError, match="no samples"):
        provenance_from_log(log)  # type: ignore[arg-type]
