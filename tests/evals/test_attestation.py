"""Signed results: statistics, signatures, and the lab's verification of each submission."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import httpx
import pytest

from airlock.canonical import canonical_bytes, legacy_bytes
from airlock.evals.attestation import (
    bootstrap_interval,
    generate_key,
    mean_with_ci,
    paired_difference,
    public_key_b64,
    sign,
    verify,
    wilson_interval,
)
from tests.conftest import HTTP_TIMEOUT, Lab
from tests.fakes import fake_attestation


def test_wilson_interval_known_values() -> None:
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_bootstrap_is_seeded_and_brackets_the_mean() -> None:
    values = [0.1, 0.5, 0.9, 0.3, 0.7, 0.2, 0.8]
    assert bootstrap_interval(values) == bootstrap_interval(values)
    lo, hi = bootstrap_interval(values)
    assert lo < sum(values) / len(values) < hi
    assert mean_with_ci([1.0, 0.0, 1.0])["method"] == "wilson"
    assert mean_with_ci([1.0, 0.5])["method"] == "bootstrap"


def test_paired_difference() -> None:
    result = paired_difference([0, 0, 1, 0, 0, 1, 0, 0], [1, 1, 1, 1, 0, 1, 1, 1])
    assert result["value"] == pytest.approx(5 / 8)
    assert 0 < result["ci95"][0] < result["value"] < result["ci95"][1] <= 1
    with pytest.raises(ValueError):
        paired_difference([1.0], [1.0, 0.0])


def test_signature_covers_every_field(tmp_path: Path) -> None:
    key = generate_key(tmp_path / "k.pem")
    assert oct((tmp_path / "k.pem").stat().st_mode)[-3:] == "600"
    with pytest.raises(FileExistsError):
        generate_key(tmp_path / "k.pem")
    att = {"a": 1, "nested": {"x": [1, 2]}, "text": "é"}
    env = sign(att, key)
    assert verify(env["attestation"], env["signature"], env["public_key"])
    assert canonical_bytes({"b": 1, "a": 2}) == b'{"a":2,"b":1}'
    for tampered in ({**att, "a": 2}, {**att, "nested": {"x": [1, 3]}}, {**att, "extra": None}):
        assert not verify(tampered, env["signature"], env["public_key"])
    other = generate_key(tmp_path / "other.pem")
    assert not verify(att, env["signature"], public_key_b64(other))
    assert not verify(att, "not-base64!", env["public_key"])


def test_attestations_signed_before_rfc8785_still_verify(tmp_path: Path) -> None:
    import base64

    key = generate_key(tmp_path / "k.pem")
    att = {"metrics": {"accuracy": {"value": 1.0}}, "n": 3}
    assert legacy_bytes(att) != canonical_bytes(att)  # 1.0 vs 1: the forms differ on this value
    old = base64.b64encode(key.sign(legacy_bytes(att))).decode()
    assert verify(att, old, public_key_b64(key))
    assert not verify({**att, "n": 4}, old, public_key_b64(key))
    # New signatures are over the RFC 8785 bytes, which any JCS implementation reproduces.
    new = sign(att, key)
    key.public_key().verify(base64.b64decode(new["signature"]), b'{"metrics":{"accuracy":{"value":1}},"n":3}')


# ---------------------------------------------------------------- lab-side verification


def attestation(lab: Lab, grant_id: str, **overrides: Any) -> dict[str, Any]:
    return fake_attestation(grant_id, **overrides)


@pytest.fixture
def signer(lab: Lab, tmp_path: Path) -> dict[str, Any]:
    grant_id, key = lab.grant("org-a")
    private = generate_key(tmp_path / "org-a.pem")
    http = httpx.Client(
        base_url=lab.url + "/v1/airlock", headers={"Authorization": f"Bearer {key}"}, timeout=HTTP_TIMEOUT
    )
    assert http.post("/signing-keys", json={"public_key": public_key_b64(private)}).status_code == 201
    return {"grant_id": grant_id, "key": key, "private": private, "http": http}


def test_valid_result_is_accepted_once(lab: Lab, signer: dict[str, Any]) -> None:
    env = sign(attestation(lab, signer["grant_id"]), signer["private"])
    resp = signer["http"].post("/results", json=env)
    assert resp.status_code == 201, resp.text
    stored = resp.json()
    assert stored["variant"] == "helpful-only" and stored["metrics"]["mean_score"]["value"] == 0.5
    assert signer["http"].post("/results", json=env).status_code == 409
    assert [r["id"] for r in signer["http"].get("/results").json()] == [stored["id"]]
    admin = httpx.get(
        lab.url + "/v1/airlock/admin/results",
        headers={"Authorization": f"Bearer {lab.admin_token}"},
        timeout=HTTP_TIMEOUT,
    ).json()
    assert [r["id"] for r in admin] == [stored["id"]]


def test_forged_and_mismatched_results_are_refused(lab: Lab, signer: dict[str, Any], tmp_path: Path) -> None:
    http, private, gid = signer["http"], signer["private"], signer["grant_id"]

    def post(env: dict[str, Any]) -> tuple[int, str]:
        resp = http.post("/results", json=env)
        body = resp.json()
        return resp.status_code, body.get("error", {}).get("code") or ""

    good = sign(attestation(lab, gid), private)
    forged = copy.deepcopy(good)
    forged["attestation"]["metrics"]["mean_score"]["value"] = 0.01  # edited after signing
    assert post(forged) == (400, "invalid_signature")

    unregistered = sign(attestation(lab, gid), generate_key(tmp_path / "rogue.pem"))
    assert post(unregistered) == (403, "unknown_signing_key")

    other_gid, _ = lab.grant("org-b", variants=["helpful-only"])
    assert post(sign(attestation(lab, other_gid), private)) == (403, "grant_mismatch")
    assert post(sign(attestation(lab, gid, evaluator="org-b"), private)) == (403, "evaluator_mismatch")
    assert post(sign(attestation(lab, gid, variant="base"), private)) == (403, "not_covered_by_grant")
    assert post(sign(attestation(lab, gid, version_hash="0" * 64), private))[0] == 404
    assert post(sign(attestation(lab, gid, model="m2", version_hash="b" * 64), private)) == (
        403,
        "not_covered_by_grant",
    )
    assert post(sign(attestation(lab, gid, samples=0), private)) == (400, "invalid_attestation")
    assert post(sign(attestation(lab, gid, schema="other/v9"), private))[0] == 400
    incomplete = attestation(lab, gid)
    del incomplete["log_sha256"]
    assert post(sign(incomplete, private)) == (400, "invalid_attestation")
    assert http.post("/results", json={"attestation": {}, "signature": "x"}).status_code == 400
    assert http.get("/results").json() == []


def test_signing_key_belongs_to_one_evaluator(lab: Lab, signer: dict[str, Any]) -> None:
    _gid, other_key = lab.grant("org-b")
    resp = httpx.post(
        lab.url + "/v1/airlock/signing-keys",
        json={"public_key": public_key_b64(signer["private"])},
        headers={"Authorization": f"Bearer {other_key}"},
        timeout=HTTP_TIMEOUT,
    )
    assert resp.status_code == 409
    bad = httpx.post(
        lab.url + "/v1/airlock/signing-keys",
        json={"public_key": "A" * 43 + "="},
        headers={"Authorization": f"Bearer {other_key}"},
        timeout=HTTP_TIMEOUT,
    )
    assert bad.status_code in (400, 201)  # 32 zero-ish bytes may or may not be a valid point; never a 500


def test_attestation_records_fine_tuned_model_and_job(tmp_path: Path) -> None:
    from airlock.evals.reporting import LogSummary, build_attestation

    log = tmp_path / "run.eval"
    log.write_bytes(b"log")
    summary = LogSummary(
        path=log,
        task="knowledge_proxy",
        model_id="ft:m1/helpful-only:org-a:probe:ftjob_0123",
        status="success",
        per_sample={("1", 1): 1.0, ("2", 1): 0.0},
        reported={},
        eval_metadata={},
        elicitation={"epochs": 1},
        dataset_hash="d" * 64,
        suite="knowledge_proxy",
        suite_version="1.0.0",
    )
    provenance = {"grant_id": "grant_x", "model": "m1", "version": "v1", "version_hash": "a" * 64}
    att = build_attestation(summary, {**provenance, "variant": "helpful-only"}, evaluator="org-a")
    assert att["elicitation"]["fine_tuned"] is True and att["elicitation"]["finetune_job"] == "ftjob_0123"
    assert att["model_id"].startswith("ft:") and att["variant"] == "helpful-only"
    assert att["metrics"]["mean_score"]["value"] == 0.5
