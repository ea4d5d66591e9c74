"""The contamination firewall over HTTP and the CLI: registration, lab checks, what each side sees, the ledger."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from airlock.access.service import create_admin_token
from airlock.cli import app as cli_app
from airlock.config import reset_settings
from airlock.contamination.matcher import Checker
from airlock.contamination.scheme import Fingerprint, fingerprint_items
from airlock.ledger import service as ledger
from airlock.ledger.models import LedgerPending
from tests.conftest import HTTP_TIMEOUT, Lab

ITEMS = [
    ("q1", "Which enzyme unwinds the double helix ahead of the replication fork in bacterial cells?"),
    ("q2", "Name the noble gas whose isotope decays into polonium inside poorly ventilated basements."),
    ("q3", "Estimate the escape velocity from a moon with half of Earth's radius and a tenth of its mass."),
]
KINDS = ["contamination.registered", "contamination.withdrawn", "contamination.check", "contamination.result"]


def _client(lab: Lab, token: str) -> httpx.Client:
    return httpx.Client(base_url=lab.url, headers={"Authorization": f"Bearer {token}"}, timeout=HTTP_TIMEOUT)


def _lab_token(lab: Lab, role: str, name: str = "") -> str:
    with lab.db.session() as session:
        return create_admin_token(session, name or f"{role}-token", role)[1]


def _ledger_text(lab: Lab) -> str:
    with lab.db.session() as session:
        return " ".join(session.scalars(select(LedgerPending.entry)).all())


def test_register_check_and_see_found_items_without_the_lab_seeing_the_test_set(lab: Lab) -> None:
    _gid, key = lab.grant("org-a")
    _gid2, other_key = lab.grant("org-b")
    fp = fingerprint_items(ITEMS, name="held-out-physics")
    admin, reviewer = _lab_token(lab, "admin"), _lab_token(lab, "reviewer")
    with _client(lab, key) as ev, _client(lab, other_key) as other, _client(lab, admin) as adm:
        created = ev.post("/v1/airlock/contamination/registrations", json=fp.to_json())
        assert created.status_code == 201, created.text
        reg = created.json()
        assert (reg["items"], reg["status"], reg["checks"], reg["found"]) == (3, "active", 0, [])
        assert other.get(f"/v1/airlock/contamination/registrations/{reg['id']}").status_code == 404
        assert other.get("/v1/airlock/contamination/registrations").json() == []

        # A role without contamination:check gets no fingerprints.
        with _client(lab, reviewer) as rev:
            denied = rev.post("/v1/airlock/admin/contamination/checks", json={"corpus": "web-2026"})
        assert denied.status_code == 403 and denied.json()["error"]["code"] == "role_not_allowed"

        opened = adm.post("/v1/airlock/admin/contamination/checks", json={"corpus": "web-2026"})
        assert opened.status_code == 201, opened.text
        check_id = opened.json()["check"]["id"]
        fps = [(f["registration"], Fingerprint.from_json(f)) for f in opened.json()["fingerprints"]]
        assert [rid for rid, _ in fps] == [reg["id"]]
        assert "replication" not in opened.text and "polonium" not in opened.text

        corpus = [
            ("doc-1", "Forum post: which enzyme unwinds the DOUBLE helix ahead of the fork in bacterial cells? Thanks"),
            ("doc-2", "A recipe for bread with flour, water, salt and a long slow rise overnight in the fridge."),
        ]
        matches = Checker(fps).check(corpus)
        assert [(m.document, m.item) for m in matches] == [("doc-1", "q1")]
        report = {
            "documents": 2,
            "matched_documents": 1,
            "corpus_digest": "ab" * 32,
            "hits": [{"registration": reg["id"], "item": "q1", "documents": 1, "max_fraction": matches[0].fraction}],
        }
        # Only the token that opened the check may report it; an item it was not given is refused.
        with _client(lab, _lab_token(lab, "admin", "second-admin")) as second_admin:
            stranger = second_admin.post(f"/v1/airlock/admin/contamination/checks/{check_id}/result", json=report)
        assert stranger.status_code == 403 and stranger.json()["error"]["code"] == "check_not_yours"
        bad = adm.post(
            f"/v1/airlock/admin/contamination/checks/{check_id}/result",
            json={**report, "hits": [{**report["hits"][0], "item": "q9"}]},
        )
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_result"
        done = adm.post(f"/v1/airlock/admin/contamination/checks/{check_id}/result", json=report)
        assert done.status_code == 200, done.text
        assert done.json()["status"] == "completed"
        again = adm.post(f"/v1/airlock/admin/contamination/checks/{check_id}/result", json=report)
        assert again.status_code == 409

        seen = ev.get(f"/v1/airlock/contamination/registrations/{reg['id']}").json()
        assert seen["checks"] == 1
        assert seen["found"] == [{"item": "q1", "documents": 1, "max_fraction": matches[0].fraction}]

        # Withdrawn: out of the next check; withdrawing twice is a conflict.
        assert ev.post(f"/v1/airlock/contamination/registrations/{reg['id']}/withdraw").json()["status"] == "withdrawn"
        assert ev.post(f"/v1/airlock/contamination/registrations/{reg['id']}/withdraw").status_code == 409
        assert adm.post("/v1/airlock/admin/contamination/checks", json={}).json()["fingerprints"] == []
        assert [c["status"] for c in adm.get("/v1/airlock/admin/contamination/checks").json()] == ["open", "completed"]

    with lab.db.session() as session:
        logged = [(e.kind, e.body) for e in ledger.logged_events(session, KINDS)]
    kinds = [k for k, _ in logged]
    assert kinds == [
        "contamination.registered",
        "contamination.check",
        "contamination.result",
        "contamination.withdrawn",
        "contamination.check",
    ]
    assert logged[0][1]["items"] == 3 and logged[0][1]["digest"] == reg["digest"]
    assert logged[2][1]["items_found"] == {reg["id"]: 1} and logged[2][1]["matched_documents"] == 1
    # No test text, hash, salt or corpus label in any ledger entry.
    text = _ledger_text(lab)
    for needle in (
        "enzyme",
        "polonium",
        "held-out-physics",
        "web-2026",
        fp.salt.hex(),
        fp.to_json()["items"][0]["shingles"],
    ):
        assert needle not in text
    audited = {(r.path, r.outcome) for r in lab.audit_rows() if "contamination" in (r.path or "")}
    assert ("/v1/airlock/admin/contamination/checks", "denied") in audited
    assert ("/v1/airlock/contamination/registrations", "allowed") in audited


def test_a_malformed_fingerprint_is_a_400_and_nothing_is_stored(lab: Lab) -> None:
    _gid, key = lab.grant("org-a")
    data = fingerprint_items(ITEMS).to_json()
    data["items"][0]["shingles"] = "not base64!"
    with _client(lab, key) as ev:
        resp = ev.post("/v1/airlock/contamination/registrations", json=data)
        assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_fingerprint"
        assert ev.get("/v1/airlock/contamination/registrations").json() == []
    assert "contamination.registered" not in _ledger_text(lab)


def _run(args: list[str], env: dict[str, str]) -> Any:
    result = CliRunner().invoke(cli_app, args, env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def test_the_cli_from_test_set_to_check_in_both_modes(
    lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _gid, key = lab.grant("org-a")
    testset = tmp_path / "testset.jsonl"
    testset.write_text("".join(json.dumps({"question": q, "qid": i}) + "\n" for i, q in ITEMS))
    fp_file = tmp_path / "fp.json"
    _run(["contamination", "fingerprint", str(testset), "--field", "question", "-o", str(fp_file)], {})
    assert "enzyme" not in fp_file.read_text()
    evaluator = {"AIRLOCK_BASE_URL": lab.url + "/v1", "AIRLOCK_API_KEY": key}
    assert "3 item(s)" in _run(["contamination", "register", str(fp_file)], evaluator).output

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(
        "ESTIMATE the escape velocity from a moon with half of Earth’s radius and a tenth of its mass"
    )
    (corpus / "b.txt").write_text("nothing to see here but an ordinary sentence about the weather and the sea")
    out = tmp_path / "matches.jsonl"
    # The operator, on the database.
    monkeypatch.setenv("AIRLOCK_DATABASE_URL", lab.db.engine.url.render_as_string(hide_password=False))
    reset_settings()
    first = _run(["contamination", "check", str(corpus), "--out", str(out)], {})
    assert "1 document(s) overlap" in first.output
    assert [(m["document"], m["item"]) for m in map(json.loads, out.read_text().splitlines())] == [("a.txt", "3")]
    # A lab token over HTTP.
    token = _lab_token(lab, "admin", "data-team")
    second = _run(["contamination", "check", str(corpus), "--url", lab.url, "--token", token], {})
    assert "1 document(s) overlap" in second.output
    status = _run(["contamination", "status"], evaluator).output
    assert "item 3 in 2 document(s)" in status
