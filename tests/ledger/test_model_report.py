"""The Model Report section: statements derived from proven ledger entries, re-checked offline, edits detected."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select

from airlock.businessdays import Calendar, load_calendar
from airlock.config import Settings, WitnessEndpoint
from airlock.db import Database
from airlock.ledger import service
from airlock.ledger._cosig import Cosigner, add_signature_lines
from airlock.ledger.cosign import request_body
from airlock.ledger.model_report import render_markdown, sample_indices, verify_model_report
from airlock.ledger.models import LedgerCheckpoint
from airlock.ledger.reporting import build_model_report
from airlock.ledger.verify import main as verify_main
from airlock.ledger.witness import Witness

V1 = {"model": "m1", "label": "v1", "hash": "ab" * 32}
V2 = {"model": "m1", "label": "v2", "hash": "cd" * 32}


def test_business_days_follow_the_eu_calendar(tmp_path: Path) -> None:
    """Weekends and the shared EU holidays are skipped; a holiday file adds its own days."""
    eu = Calendar()
    # 2026: Good Friday 3 April, Easter Monday 6 April.
    assert eu.business_days(date(2026, 3, 30), date(2026, 4, 13)) == 8
    assert eu.business_days(date(2026, 4, 13), date(2026, 4, 13)) == 0
    assert eu.business_days(date(2026, 1, 1), date(2027, 1, 1)) == sum(
        eu.is_business_day(date.fromordinal(d))
        for d in range(date(2026, 1, 1).toordinal(), date(2027, 1, 1).toordinal())
    )
    assert eu.add_business_days(datetime(2026, 4, 2, 9, tzinfo=UTC), 1) == datetime(2026, 4, 7, 9, tzinfo=UTC)
    path = tmp_path / "cal.yaml"
    path.write_text("name: lab\nbase: none\nweekend: [fri, sat]\nholidays: [2026-03-31]\n")
    lab = load_calendar(path)
    assert lab.business_days(date(2026, 3, 29), date(2026, 4, 5)) == 4  # Sun, Mon, Wed, Thu
    assert Calendar.from_description(lab.describe([2026])) == lab
    path.write_text("nmae: typo\n")
    with pytest.raises(ValueError, match="unknown keys"):
        load_calendar(path)


def test_samples_are_a_pure_function_of_root_and_result() -> None:
    """Five distinct indices, the same every time, different for another root."""
    a = sample_indices(b"\x01" * 32, "res_1", 40)
    assert a == sample_indices(b"\x01" * 32, "res_1", 40) and len(set(a)) == 5 and all(0 <= i < 40 for i in a)
    assert a != sample_indices(b"\x02" * 32, "res_1", 40)
    assert sample_indices(b"\x01" * 32, "res_1", 3) == [0, 1, 2]


def _record(db: Database) -> None:
    with db.session() as session:
        body = {
            "grant": "grt_1",
            "evaluator": "org-a",
            "model": "m1",
            "versions": [V1],
            "variants": ["helpful-only"],
            "scopes": ["sampling", "finetune"],
            "not_before": None,
            "not_after": None,
            "embargo_days": 30,
            "interp_full_logits": False,
        }
        service.record_event(session, "grant.issued", body, confidential={"quotas": {"total_tokens": 10**6}})
        other = {**body, "grant": "grt_2", "evaluator": "org-b", "versions": [V2]}
        service.record_event(session, "grant.issued", other, confidential={"quotas": {}})
        metrics = {"mean_score": {"value": 0.25, "ci95": [0.1, 0.4], "n": 40, "method": "wilson"}}
        attested = {
            "result": "res_1",
            "grant": "grt_1",
            "evaluator": "org-a",
            "version": V1,
            "variant": "helpful-only",
            "suite": "knowledge_proxy",
            "task": "knowledge_proxy",
            "samples": 40,
            "fine_tuned": False,
            "log_sha256": "11" * 32,
            "embargoed": False,
            "metrics": metrics,
        }
        service.record_event(session, "eval.attested", attested)
        service.record_event(session, "test.noise", {"i": 1})
        decision = {
            "decision_id": "gd_1",
            "model": "m1",
            "version": "v1",
            "version_hash": V1["hash"],
            "from_stage": "internal",
            "stage": "deployed",
            "decision": "block",
            "domains": {"bio": "cannot_rule_out"},
            "blocking": ["domain bio: cannot_rule_out"],
            "evidence_result_ids": ["res_1"],
        }
        service.record_event(session, "gate.decision", decision)
        override = {
            "decision_id": "gd_1",
            "version_hash": V1["hash"],
            "stage": "deployed",
            "decider": "dana",
            "role": "decider",
            "justification": "accepted with the safeguards documented in the safety case",
            "blocking": decision["blocking"],
        }
        service.record_event(session, "gate.override", override)
        service.record_event(session, "stage.changed", {"version": V1, "from": "internal", "to": "deployed"})
        for n, severity in enumerate(("low", "critical")):
            finding = {"finding": f"rtf_{n}", "evaluator": "org-a", "version": V1, "variant": "production"}
            finding |= {"category": "jailbreak", "severity": severity, "session": "rts_1", "grant": "grt_1"}
            service.record_event(session, "redteam.finding", finding)
        triage = {"finding": "rtf_1", "version": V1, "variant": "production", "severity": "critical"}
        service.record_event(session, "redteam.triage", {**triage, "status": "fixed", "fixed_in": V2, "role": "admin"})
        subject = {"report_id": "rpt_1", "evaluator": "org-a", "model": "m1", "version_hash": V1["hash"]}
        extended = {
            "submitted_at": "2030-01-04T12:00:00+00:00",  # a Friday
            "business_days": 5,
            "previous_deadline": "2030-02-15T12:00:00+00:00",
            "new_deadline": "2030-02-22T12:00:00+00:00",
            "justification": "a fix to the serving stack ships first",
            "decider": "dana",
            "role": "decider",
        }
        service.record_event(session, "report.extended", {**subject, **extended})
        published = {"reason": "deadline", "submitted_at": extended["submitted_at"]}
        published |= {"published_at": "2030-02-22T12:00:00+00:00", "publish_by": extended["new_deadline"]}
        service.record_event(session, "report.published", {**subject, **published})


def _cosign(db: Database, witnesses: list[Witness]) -> None:
    with db.session() as session:
        row = session.scalar(select(LedgerCheckpoint).order_by(LedgerCheckpoint.id.desc()))
        assert row is not None
        lines = [w.add_checkpoint(request_body(0, [], row.note)).body for w in witnesses]
        row.note = add_signature_lines(row.note, lines)


def test_report_is_proven_and_every_edit_is_detected(db: Database, tmp_path: Path) -> None:
    """Statements cite proven entries; the verifier re-derives them; edits, padding and missing quorum fail."""
    witnesses = [
        Witness(Cosigner(f"w.example/{i}", Ed25519PrivateKey.generate()), [], tmp_path / f"w{i}.db") for i in range(2)
    ]
    settings = Settings(
        home=tmp_path / "home",
        ledger_witnesses=[WitnessEndpoint(url="http://127.0.0.1:9", key=w.verifier.vkey()) for w in witnesses],
    )
    signer = service.get_signer(settings)
    for w in witnesses:
        w.logs[signer.name] = signer.verifier
    _record(db)
    service.publish_checkpoint(db, signer)
    _cosign(db, witnesses)
    report = build_model_report(db, settings, "m1", "v1")
    assert report["witnessed_by"] == ["w.example/0", "w.example/1"]
    kinds = [s["kind"] for s in report["statements"]]
    # org-b's v2 grant and the noise left out; findings last, worst first, with their triage
    assert kinds[:8] == ["access", "result", "gate", "override", "stage", "findings_by_severity", "finding", "finding"]
    (publication,) = report["statements"][8:]
    assert publication["kind"] == "publication" and publication["reason"] == "deadline"
    # Fri 4 Jan to Fri 22 Feb 2030 on the EU calendar: 35 weekdays, no EU holiday between.
    assert publication["business_days_to_publication"] == 35 and len(publication["cites"]) == 2
    assert publication["extensions"][0]["justification"] == "a fix to the serving stack ships first"
    summary, worst = report["statements"][5:7]
    assert summary["counts"] == {"critical": 1, "low": 1} and summary["open"] == 1
    assert worst["severity"] == "critical" and worst["status"] == "fixed" and len(worst["cites"]) == 2
    access, result, gate = report["statements"][:3]
    assert access["evaluator"] == "org-a" and access["business_days_before_stage_changes"][0]["stage"] == "deployed"
    assert len(result["sample_selection"]["indices"]) == 5 and result["metrics"]["mean_score"]["value"] == 0.25
    assert gate["external_results_in_evidence"] == ["res_1"]
    key = signer.verifier.vkey()
    wkeys = [w.verifier for w in witnesses]
    assert verify_model_report(report, key, witnesses=wkeys, quorum=2) == []

    edited = json.loads(json.dumps(report))
    edited["statements"][1]["metrics"]["mean_score"]["value"] = 0.05
    assert any("differs in ['metrics']" in p for p in verify_model_report(edited, key))
    edited = json.loads(json.dumps(report))
    edited["statements"][0]["business_days_before_stage_changes"][0]["business_days"] += 20
    assert verify_model_report(edited, key)
    edited = json.loads(json.dumps(report))
    edited["statements"][1]["sample_selection"]["indices"][0] += 1
    assert verify_model_report(edited, key)
    edited = json.loads(json.dumps(report))
    edited["entries"][1]["entry"] = edited["entries"][1]["entry"].replace("0.25", "0.05")
    assert any("not proven" in p for p in verify_model_report(edited, key))
    edited = json.loads(json.dumps(report))
    edited["statements"][5]["counts"]["critical"] = 0
    assert verify_model_report(edited, key)
    edited = json.loads(json.dumps(report))
    del edited["statements"][3]
    assert verify_model_report(edited, key)
    edited = json.loads(json.dumps(report))
    edited["statements"][8]["extensions"][0]["justification"] = "routine"
    assert any("differs in ['extensions']" in p for p in verify_model_report(edited, key))
    edited = json.loads(json.dumps(report))
    edited["calendar"]["holidays"] = edited["calendar"]["holidays"][1:]
    assert any("calendar" in p for p in verify_model_report(edited, key))
    assert any("quorum" in p for p in verify_model_report(report, key, witnesses=wkeys[:1], quorum=2))

    md = tmp_path / "report.md"
    md.write_text(render_markdown(report))
    assert "| org-a |" in md.read_text() and "delayed by dana (decider): +5 business days" in md.read_text()
    args = ["--key", key, "--witness", wkeys[0].vkey(), "--witness", wkeys[1].vkey()]
    assert verify_main(["--model-report", str(md), *args]) == 0
    md.write_text(md.read_text().replace("0.25", "0.35", 1))
    assert verify_main(["--model-report", str(md), *args]) == 1
    as_json = tmp_path / "report.json"
    as_json.write_text(json.dumps(report))
    assert verify_main(["--model-report", str(as_json), "--key", key]) == 0
