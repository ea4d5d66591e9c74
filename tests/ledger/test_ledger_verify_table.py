"""The offline verifier's answer to the public questions, from synthetic entries (no database)."""

from __future__ import annotations

from typing import Any

from airlock.ledger.verify import access_table, render_access

V1 = {"model": "m1", "label": "v1", "hash": "a" * 64}
V2 = {"model": "m1", "label": "v2", "hash": "b" * 64}


def _e(kind: str, time: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"v": 1, "id": f"lev_{kind}_{time}", "kind": kind, "time": time, "body": body}


ENTRIES = [
    _e(
        "grant.issued",
        "2026-01-01T00:00:00.000000Z",
        {
            "grant": "grant_a",
            "evaluator": "org-a",
            "model": "m1",
            "versions": [V1, V2],
            "variants": ["helpful-only"],
            "scopes": ["sample", "finetune"],
            "not_before": "2026-01-05T00:00:00.000000Z",
            "not_after": None,
        },
    ),
    _e(
        "grant.issued",
        "2026-01-08T00:00:00.000000Z",
        {
            "grant": "grant_b",
            "evaluator": "org-b",
            "model": "m1",
            "versions": [V1],
            "variants": ["production"],
            "scopes": ["sample"],
            "not_before": "2026-01-01T00:00:00.000000Z",
            "not_after": "2026-03-01T00:00:00.000000Z",
        },
    ),
    _e("grant.revoked", "2026-01-12T00:00:00.000000Z", {"grant": "grant_b", "revoked_at": "2026-01-12T00:00:00Z"}),
    _e(
        "eval.attested",
        "2026-01-10T00:00:00.000000Z",
        {
            "grant": "grant_a",
            "evaluator": "org-a",
            "version": V1,
            "variant": "helpful-only",
            "suite": "cyber",
            "task": "ctf_lite",
            "log_sha256": "e" * 64,
            "embargoed": True,
        },
    ),
    _e("stage.changed", "2026-01-15T12:00:00.000000Z", {"version": V1, "from": "external-candidate", "to": "deployed"}),
    _e("grant.issued", "2026-01-01T00:00:00.000000Z", {"grant": "grant_c", "evaluator": "org-c", "model": "m2"}),
]


def test_access_rows_days_and_results() -> None:
    """Access starts at max(issued, not_before); days count to deployment; revocation ends access."""
    rows = access_table(ENTRIES, "m1", "v1")
    assert [(r.evaluator, r.version) for r in rows] == [("org-a", "v1"), ("org-b", "v1")]
    a, b = rows
    assert a.days_before_deployment == 10.5 and b.days_before_deployment == 7.5
    assert b.access_until is not None and b.access_until.day == 12
    assert a.results == ["cyber/ctf_lite [helpful-only] metrics committed (embargo) (log eeeeeeeeeeee…, at 2026-01-10)"]
    assert b.results == []
    assert [r.version for r in access_table(ENTRIES, "m1")] == ["v1", "v1", "v2"]
    assert access_table(ENTRIES, "m1", "bbbb")[0].days_before_deployment is None
    text = render_access(rows, "m1")
    assert "org-a" in text and "10.5" in text and "7.5" in text


def test_public_surface_is_pinned_and_needs_no_database() -> None:
    """The package exports exactly its offline-verification surface, importable without SQLAlchemy."""
    import subprocess
    import sys

    import airlock.ledger

    # The root re-exports the offline-verification surface; the service modules it lists for other
    # packages are not imported with it (they need the database).
    modules = {"cli", "cosign", "model_report", "models", "reporting", "routes", "service", "witness"}
    assert modules <= set(airlock.ledger.__all__)
    assert set(airlock.ledger.__all__) - modules == {
        "Checkpoint",
        "commitment_of",
        "NoteError",
        "ProofError",
        "Report",
        "Verifier",
        "WitnessVerifier",
        "access_table",
        "leaf_hash",
        "node_hash",
        "verify_bundle",
        "verify_checkpoint",
        "verify_consistency",
        "verify_inclusion",
    }
    assert all(hasattr(airlock.ledger, name) for name in set(airlock.ledger.__all__) - modules)
    code = "import sys, airlock.ledger.verify; print(sorted(m for m in sys.modules if m.split('.')[0] in "
    code += "('sqlalchemy', 'fastapi', 'airlock') and not m.startswith('airlock.ledger') and m != 'airlock'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['airlock.canonical']"  # the kernel's one canonical JSON, and nothing else
