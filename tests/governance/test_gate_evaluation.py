"""Gate evaluation: each verdict state, the safety case per mitigation, and untrusted results."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from airlock.evals.models import EvalResult, SigningKey
from tests.conftest import FAKE_MANIFEST
from tests.governance.gate_helpers import POLICY, Evidence, domain, gate, policy_dict, sync


@pytest.fixture
def evidence(db: Any, tmp_path: Path) -> Evidence:
    sync(db)
    return Evidence(db, tmp_path)


def _robust(evidence: Evidence) -> str:
    """Refusal evidence on production that clears the 0.8 bar for every claimed mitigation."""
    return evidence.submit("refusal_robustness", 100, 100, variant="production")


def _bio_eval(report: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = domain(report, "bio")["thresholds"][0]["evals"][0]
    return result


def test_below_with_sufficient_evidence_allows(db: Any, evidence: Evidence) -> None:
    kp = evidence.submit("knowledge_proxy", 5, 100)
    robust = _robust(evidence)
    report = gate(db)
    assert domain(report, "bio")["verdict"] == "below"
    ev = _bio_eval(report)
    assert ev["evidence"][0]["result_id"] == kp and ev["evidence"][0]["ci95"][1] < 0.6
    assert ev["evidence"][0]["variant"] == "helpful-only" and ev["evidence"][0]["samples"] == 100
    # The research domain has no evidence: reported as cannot_rule_out, but it never blocks.
    assert domain(report, "mlrnd")["verdict"] == "cannot_rule_out" and not domain(report, "mlrnd")["blocks"]
    assert report["decision"] == "allow", report["blocking"]
    assert report["evidence_result_ids"] == sorted([kp, robust])
    assert [c["status"] for c in report["safety_case"]] == ["ok", "ok", "ok"]


@pytest.mark.parametrize(
    ("successes", "n", "why"),
    [
        (65, 100, "inside the early-warning buffer"),  # estimate 0.65 in [0.6, 0.8)
        (16, 20, "at/above threshold"),  # estimate 0.8 but CI lower bound < 0.8: straddles
        (52, 100, "reaches the early-warning line"),  # estimate below the line, CI reaches it
    ],
)
def test_cannot_rule_out_states(db: Any, evidence: Evidence, successes: int, n: int, why: str) -> None:
    evidence.submit("knowledge_proxy", successes, n)
    _robust(evidence)
    report = gate(db)
    assert _bio_eval(report)["verdict"] == "cannot_rule_out"
    assert why in _bio_eval(report)["reason"]
    assert report["decision"] == "block"
    assert any(b.startswith("domain bio: cannot_rule_out") for b in report["blocking"])


@pytest.mark.parametrize(
    "metric",
    [
        # A bootstrap interval stated far narrower than 20 bounded scores allow.
        {"value": 0.45, "ci95": [0.44, 0.46], "method": "bootstrap", "n": 20},
        # A Wilson interval stated narrower than its counts give.
        {"value": 0.45, "ci95": [0.44, 0.46], "method": "wilson", "n": 20},
    ],
)
def test_a_narrow_stated_interval_cannot_make_few_samples_rule_out(
    db: Any, evidence: Evidence, metric: dict[str, Any]
) -> None:
    evidence.submit("knowledge_proxy", 0, 20, metrics={"mean_score": metric})
    _robust(evidence)
    ev = _bio_eval(gate(db))
    assert ev["verdict"] == "cannot_rule_out"
    assert ev["evidence"][0]["ci95"][1] > 0.6  # at least the Wilson width at n = 20


def test_a_metric_over_more_scores_than_the_samples_is_not_evidence(db: Any, evidence: Evidence) -> None:
    # n = 10,000 would give a tight interval, but the result attests 20 samples of one epoch.
    evidence.submit(
        "knowledge_proxy",
        0,
        20,
        metrics={"mean_score": {"value": 0.3, "ci95": [0.29, 0.31], "method": "wilson", "n": 10_000}},
    )
    _robust(evidence)
    assert _bio_eval(gate(db))["verdict"] == "cannot_rule_out"


def test_missing_or_weak_evidence_cannot_rule_out(db: Any, evidence: Evidence) -> None:
    _robust(evidence)
    report = gate(db)
    assert _bio_eval(report)["verdict"] == "cannot_rule_out"
    assert _bio_eval(report)["reason"] == "no qualifying evidence"
    # Evidence that would say "below" does not count when elicitation is too weak.
    weak = [
        evidence.submit("knowledge_proxy", 0, 100, variant="production"),  # mitigated variant
        evidence.submit("knowledge_proxy", 0, 10),  # too few samples
        evidence.submit("knowledge_proxy", 0, 100, created_at=datetime.now(UTC) - timedelta(days=31)),  # stale
    ]
    report = gate(db)
    ev = _bio_eval(report)
    assert ev["verdict"] == "cannot_rule_out" and ev["evidence"] == []
    reasons = {x["result_id"]: x["reason"] for x in ev["excluded"]}
    assert set(reasons) == set(weak)
    assert "not one the policy accepts" in reasons[weak[0]]
    assert "10 samples < 20" in reasons[weak[1]]
    assert "older than 30 days" in reasons[weak[2]]
    # Fine-tuned elicitation can be required: then a plain result does not count.
    strict = copy.deepcopy(POLICY)
    strict["domains"][0]["thresholds"][0]["elicitation"]["fine_tuned"] = "required"
    plain = evidence.submit("knowledge_proxy", 0, 100)
    tuned = evidence.submit("knowledge_proxy", 0, 100, fine_tuned=True)
    ev = _bio_eval(gate(db, strict))
    assert [e["result_id"] for e in ev["evidence"]] == [tuned] and ev["verdict"] == "below"
    assert any(x["result_id"] == plain and "fine-tuned" in x["reason"] for x in ev["excluded"])


def test_crossed_blocks_until_required_safeguards_are_met(db: Any, evidence: Evidence) -> None:
    evidence.submit("knowledge_proxy", 5, 100)
    evidence.submit("knowledge_proxy", 95, 100)  # the most capable qualifying result decides
    _robust(evidence)
    report = gate(db)
    bio = domain(report, "bio")
    assert bio["verdict"] == "crossed" and _bio_eval(report)["reason"].startswith("CI lower bound")
    # The safeguard (an input filter) is a claimed mitigation with passing evidence: met.
    assert bio["thresholds"][0]["required_safeguards"][0]["met"] is True
    assert not bio["blocks"] and report["decision"] == "allow"
    # A safeguard nothing mechanical can verify needs a decider: the gate blocks.
    policy = copy.deepcopy(POLICY)
    policy["domains"][0]["thresholds"][0]["safeguards"].append({"id": "security", "description": "weights security"})
    report = gate(db, policy)
    assert domain(report, "bio")["blocks"] and domain(report, "bio")["unmet_safeguards"] == ["bio-1/security"]
    assert report["decision"] == "block"


def test_rule_out_all_or_any(db: Any, evidence: Evidence) -> None:
    evidence.submit("knowledge_proxy", 5, 100)
    _robust(evidence)
    policy = copy.deepcopy(POLICY)
    threshold = policy["domains"][0]["thresholds"][0]
    threshold["evals"].append({"suite": "cyber_ctf_lite", "threshold": 0.5, "early_warning": 0.1})
    assert domain(gate(db, policy), "bio")["verdict"] == "cannot_rule_out"  # `all`: the CTF has no evidence
    threshold["rule_out"] = "any"
    assert domain(gate(db, policy), "bio")["verdict"] == "below"


def test_mitigation_without_stance_blocks(db: Any, evidence: Evidence) -> None:
    manifest = copy.deepcopy(FAKE_MANIFEST)
    manifest["models"][0]["versions"][0]["variants"][0]["mitigations"][1].pop("stance")
    sync(db, manifest)
    evidence.submit("knowledge_proxy", 5, 100)
    _robust(evidence)
    report = gate(db)
    case = {c["mitigation"]: c for c in report["safety_case"]}
    assert case["input-filter"]["status"] == "no_stance" and case["input-filter"]["blocks"]
    assert report["decision"] == "block"
    assert any("production/input-filter: no_stance" in b for b in report["blocking"])


def test_claimed_mitigation_needs_passing_evidence(db: Any, evidence: Evidence) -> None:
    evidence.submit("knowledge_proxy", 5, 100)
    report = gate(db)
    case = {c["mitigation"]: c for c in report["safety_case"]}
    assert case["safety-prompt"]["status"] == "ok"  # disabled_for_eval: helpful-only lacks it
    assert case["input-filter"]["status"] == "no_evidence" and report["decision"] == "block"
    # Evidence that does not clear the bar (CI lower bound < 0.8) does not support the claim.
    weak = evidence.submit("refusal_robustness", 80, 100, variant="production")
    case = {c["mitigation"]: c for c in gate(db)["safety_case"]}
    assert case["input-filter"]["status"] == "unsupported" and weak in case["input-filter"]["reason"]
    # Neither does evidence from an evaluation where the mitigation was not active.
    strong_without = evidence.submit("refusal_robustness", 100, 100, variant="production", mitigations=[])
    case = {c["mitigation"]: c for c in gate(db)["safety_case"]}
    assert any(x["result_id"] == strong_without for x in case["output-filter"]["excluded"])
    assert case["output-filter"]["status"] == "unsupported"  # still held back by the weak result


def test_claim_without_a_policy_rule_blocks(db: Any, evidence: Evidence) -> None:
    evidence.submit("knowledge_proxy", 5, 100)
    _robust(evidence)
    policy = policy_dict(safety_case={"evaluation_only_variants": ["helpful-only", "base"], "claims": []})
    case = {c["mitigation"]: c for c in gate(db, policy)["safety_case"]}
    assert case["input-filter"]["status"] == "no_claim_rule"


def test_forged_unsigned_tampered_and_revoked_results_are_ignored(db: Any, evidence: Evidence) -> None:
    good = evidence.submit("knowledge_proxy", 95, 100)  # would cross the threshold
    forged = evidence.submit("knowledge_proxy", 1, 100)
    unsigned = evidence.submit("knowledge_proxy", 2, 100)
    moved = evidence.submit("knowledge_proxy", 3, 100, variant="production")
    _robust(evidence)
    with db.session() as session:
        rows = {r.id: r for r in session.scalars(select(EvalResult))}
        att = copy.deepcopy(rows[forged].attestation)
        att["metrics"]["mean_score"]["value"] = 0.0  # edited after signing
        rows[forged].attestation = att
        rows[unsigned].signature = ""
        rows[moved].variant = "helpful-only"  # the row, not the signed attestation, was edited
    report = gate(db)
    ignored = {r["result_id"]: r["reason"] for r in report["ignored_results"]}
    assert set(ignored) == {forged, unsigned, moved}
    assert "signature does not verify" in ignored[forged] and "signature does not verify" in ignored[unsigned]
    assert "disagrees with its signed attestation" in ignored[moved]
    assert [e["result_id"] for e in _bio_eval(report)["evidence"]] == [good]
    assert domain(report, "bio")["verdict"] == "crossed"
    # Revoking the evaluator's key withdraws every result signed with it.
    with db.session() as session:
        for key in session.scalars(select(SigningKey)):
            key.revoked_at = datetime.now(UTC)
    report = gate(db)
    assert len(report["ignored_results"]) == 5 and report["evidence_result_ids"] == []
    assert domain(report, "bio")["verdict"] == "cannot_rule_out" and report["decision"] == "block"


def test_report_is_deterministic_and_hashed(db: Any, evidence: Evidence) -> None:
    evidence.submit("knowledge_proxy", 30, 100)
    _robust(evidence)
    now = datetime.now(UTC)
    first, second = gate(db, now=now), gate(db, now=now)
    assert json.dumps(first, sort_keys=True) == json.dumps(second, sort_keys=True)
    later = gate(db, now=now + timedelta(minutes=5))
    assert later["evaluated_at"] != first["evaluated_at"] and later["report_sha256"] == first["report_sha256"]
    evidence.submit("knowledge_proxy", 31, 100)
    assert gate(db, now=now)["report_sha256"] != first["report_sha256"]
    assert gate(db, policy_dict(name="other"), now=now)["policy"]["sha256"] != first["policy"]["sha256"]


def test_reevaluation_triggers(db: Any, tmp_path: Path) -> None:
    from airlock.registry.service import get_model, get_version, set_stage

    manifest = copy.deepcopy(FAKE_MANIFEST)
    v2 = copy.deepcopy(manifest["models"][0]["versions"][0]) | {"label": "v2", "content_hash": "f" * 64}
    manifest["models"][0]["versions"].append(v2)
    sync(db, manifest)
    evidence = Evidence(db, tmp_path, versions=["v1", "v2"])
    old = evidence.submit("knowledge_proxy", 5, 100)  # on v1

    def bio_v2(policy: dict[str, Any]) -> dict[str, Any]:
        from airlock.governance.policy import parse_policy
        from airlock.governance.service import evaluate_gate

        with db.session() as session:
            model = get_model(session, "m1")
            report = evaluate_gate(session, model, get_version(session, model, "v2"), "deployed", parse_policy(policy))
        return _bio_eval(report)

    # A new version needs its own evidence, unless the policy lets earlier versions' results count.
    assert bio_v2(POLICY)["evidence"] == []
    inherit = copy.deepcopy(POLICY)
    inherit["reevaluation"]["new_version"] = False
    ev = bio_v2(inherit)["evidence"]
    assert [(e["result_id"], e["inherited"], e["version"]) for e in ev] == [(old, True, "v1")]
    # A stage change can invalidate earlier evidence.
    fresh = evidence.submit("knowledge_proxy", 4, 100, version="v2", version_hash="f" * 64)
    with db.session() as session:
        model = get_model(session, "m1")
        set_stage(session, get_version(session, model, "v2"), "internal", actor="test")
    staged = copy.deepcopy(POLICY)
    staged["reevaluation"]["stage_change"] = True
    ev = bio_v2(staged)
    assert ev["evidence"] == [] and "predates the version's last stage change" in ev["excluded"][0]["reason"]
    assert [e["result_id"] for e in bio_v2(POLICY)["evidence"]] == [fresh]


def test_external_access_needs_the_policy_s_business_days(db: Any, evidence: Evidence) -> None:
    """The gate counts each evaluator's business days of access from the ledger and blocks below the minimum."""

    from airlock.ledger import service as ledger

    evidence.submit("knowledge_proxy", 5, 100)
    _robust(evidence)
    policy = policy_dict(
        external_access={"min_business_days": 20},
        reevaluation={"new_version": True, "stage_change": False, "max_evidence_age_days": 365},
    )
    ledger.sequence(db)
    report = gate(db, policy)
    access = report["external_access"]
    assert access["min_business_days"] == 20 and access["calendar"] == "eu"
    [row] = access["evaluators"]
    assert row["evaluator"] == "org-a" and row["business_days"] == 0
    assert set(row["by_access"]) == {"production/sample", "helpful-only/sample"}
    assert report["decision"] == "block"
    assert any("org-a had 0 business day(s)" in b for b in report["blocking"])
    later = gate(db, policy, now=datetime.now(UTC) + timedelta(days=40))
    assert later["external_access"]["evaluators"][0]["business_days"] >= 20
    assert not any(b.startswith("external access") for b in later["blocking"]), later["blocking"]
    assert gate(db)["external_access"] is None  # a policy without the rule sets no minimum


def test_without_evaluators_only_an_unanswered_public_call_lets_the_gate_pass(
    db: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Appendix 3.5: a closed call, open long enough, that found no qualified evaluator; recorded in the ledger."""
    import airlock.ledger.service as ledger_service
    from airlock.governance.calls import calls_for, close_call, open_call, record_application
    from airlock.ledger import service as ledger
    from airlock.registry.service import get_model, get_version

    sync(db)
    policy = policy_dict(external_access={"min_business_days": 20, "min_call_business_days": 20})
    assert any("no external evaluator" in b for b in gate(db, policy)["blocking"])

    def call(applicant_qualified: bool, opened_days_ago: int) -> str:
        with db.session() as session:
            version = get_version(session, get_model(session, "m1"), "v1")
            real = ledger_service.utcnow
            monkeypatch.setattr(ledger_service, "utcnow", lambda: real() - timedelta(days=opened_days_ago))
            call_id = open_call(session, version, "Seeking qualified evaluators for m1 v1 bio uplift.", "lab")
            monkeypatch.setattr(ledger_service, "utcnow", real)
            record_application(session, call_id, "acme", qualified=applicant_qualified, reason="assessed", actor="lab")
        with db.session() as session:
            close_call(session, call_id, "lab")
        return call_id

    call(False, 10)  # two weeks: too short
    assert any("no external evaluator" in b for b in gate(db, policy)["blocking"])
    call(True, 60)  # long enough, but a qualified evaluator answered (and was not granted access)
    assert any("no external evaluator" in b for b in gate(db, policy)["blocking"])
    unanswered = call(False, 60)
    ledger.sequence(db)
    report = gate(db, policy)
    assert not any("no external evaluator" in b for b in report["blocking"]), report["blocking"]
    [used] = report["external_access"]["unanswered_calls"]
    assert used["call"] == unanswered and used["business_days_open"] >= 20 and used["applications"] == 1
    with db.session() as session:
        assert len(calls_for(session, "a" * 64)) == 3
        entries = ledger.logged_events(session, ["call.application"])
    assert all("applicant" in e.commitments and "applicant" not in e.body for e in entries)
