"""Red-teaming over HTTP: sessions side by side, transcripts, hours, findings, triage and the gate."""

from __future__ import annotations

import json
from typing import Any

import httpx
from sqlalchemy import update

from airlock.access.service import create_admin_token
from airlock.governance.policy import parse_policy
from airlock.governance.service import evaluate_gate
from airlock.ledger import service as ledger
from airlock.redteam.models import RedteamSession
from airlock.registry.models import Model
from airlock.registry.service import get_version
from tests.conftest import HTTP_TIMEOUT, Lab
from tests.governance.gate_helpers import POLICY


def _client(lab: Lab, token: str) -> httpx.Client:
    return httpx.Client(base_url=lab.url, headers={"Authorization": f"Bearer {token}"}, timeout=HTTP_TIMEOUT)


def _gate(lab: Lab) -> dict[str, Any]:
    with lab.db.session() as session:
        model = session.query(Model).filter_by(name="m1").one()
        version = get_version(session, model, "v1")
        return evaluate_gate(session, model, version, "deployed", parse_policy(POLICY))


def _lab_token(lab: Lab, role: str) -> str:
    with lab.db.session() as session:
        return create_admin_token(session, f"{role}-token", role)[1]


def test_a_side_by_side_session_keeps_its_transcript_and_stays_private(lab: Lab) -> None:
    _gid, key = lab.grant("org-a", scopes=["redteam"])
    _gid2, other = lab.grant("org-b", scopes=["redteam"])
    with _client(lab, key) as rt, _client(lab, other) as stranger:
        # Transcripts are kept (retention_redteam=full): no session before the evaluator accepts the terms.
        refused = rt.post("/v1/airlock/redteam/sessions", json={"models": ["m1/production"]})
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "terms_not_accepted"
        assert "retention_redteam=full" in refused.json()["error"]["message"]
        lab.accept_terms(key)
        lab.accept_terms(other)
        created = rt.post(
            "/v1/airlock/redteam/sessions", json={"models": ["m1/production", "m1/helpful-only"], "title": "probe"}
        )
        assert created.status_code == 201, created.text
        sid = created.json()["id"]
        assert created.json()["variants"] == ["production", "helpful-only"]

        turn = rt.post(f"/v1/airlock/redteam/sessions/{sid}/turns", json={"content": "hello there"})
        assert turn.status_code == 201, turn.text
        answers = {r["variant"]: r for r in turn.json()["responses"]}
        assert "hello there" in answers["helpful-only"]["content"]
        assert "be safe" in answers["production"]["content"]  # production's system prompt ran in its pipeline

        # A prompt the production input filter refuses is kept too, marked as blocked for that variant only.
        with rt.stream(
            "POST", f"/v1/airlock/redteam/sessions/{sid}/turns", json={"content": "about zyloxin", "stream": True}
        ) as streamed:
            assert streamed.status_code == 200
            events = [json.loads(line[6:]) for line in streamed.iter_lines() if line.startswith("data: {")]
        deltas = {e["variant"] for e in events if "delta" in e}
        assert deltas == {"production", "helpful-only"}
        final = events[-1]["turn"]
        assert final["index"] == 1
        assert [r["blocked"] for r in final["responses"]] == [True, False]

        full = rt.get(f"/v1/airlock/redteam/sessions/{sid}").json()
        assert [t["prompt"] for t in full["transcript"]] == ["hello there", "about zyloxin"]
        # The second turn's helpful-only history carries its own first answer, not production's.
        assert full["transcript"][1]["responses"][1]["content"].endswith("about zyloxin")

        assert stranger.get(f"/v1/airlock/redteam/sessions/{sid}").status_code == 404
        assert stranger.post(f"/v1/airlock/redteam/sessions/{sid}/turns", json={"content": "x"}).status_code == 404
        assert stranger.get("/v1/airlock/redteam/sessions").json() == []
        hours = rt.get("/v1/airlock/redteam/hours").json()
        assert hours["granted"] == 10.0 and hours["used"] < 0.1
        with lab.db.session() as session:
            row = session.get(RedteamSession, sid)
            assert row is not None and row.turns == 2 and row.active_seconds > 0


def test_the_redteam_scope_and_the_hour_budget_are_enforced(lab: Lab) -> None:
    _gid, sampler = lab.grant("org-a", scopes=["sample"])
    _grant_id, key = lab.grant("org-b", scopes=["redteam"])
    lab.accept_terms(key)
    with _client(lab, sampler) as client:
        refused = client.post("/v1/airlock/redteam/sessions", json={"models": ["m1/production"]})
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "scope_not_granted"
    with _client(lab, key) as rt:
        sid = rt.post("/v1/airlock/redteam/sessions", json={"models": ["m1/production"]}).json()["id"]
        with lab.db.session() as session:
            session.execute(update(RedteamSession).where(RedteamSession.id == sid).values(active_seconds=10 * 3600))
        spent = rt.post(f"/v1/airlock/redteam/sessions/{sid}/turns", json={"content": "more"})
        assert spent.status_code == 403
        error = spent.json()["error"]
        assert error["code"] == "redteam_hours_exhausted" and "all 10 hours" in error["message"]
        assert rt.get("/v1/airlock/redteam/hours").json()["left"] == 0


def test_a_critical_finding_blocks_the_claims_until_it_is_disputed(lab: Lab) -> None:
    _grant_id, key = lab.grant("org-a", scopes=["redteam"])
    lab.accept_terms(key)
    reviewer, admin = _lab_token(lab, "reviewer"), _lab_token(lab, "admin")
    with _client(lab, key) as rt, _client(lab, reviewer) as rv, _client(lab, admin) as ad:
        sid = rt.post("/v1/airlock/redteam/sessions", json={"models": ["m1/production"]}).json()["id"]
        rt.post(f"/v1/airlock/redteam/sessions/{sid}/turns", json={"content": "tell me"}).raise_for_status()
        bad = rt.post(
            f"/v1/airlock/redteam/sessions/{sid}/findings",
            json={"turn": 0, "category": "bio", "severity": "urgent", "title": "x"},
        )
        assert bad.status_code == 400
        flagged = rt.post(
            f"/v1/airlock/redteam/sessions/{sid}/findings",
            json={"turn": 0, "category": "bio", "severity": "critical", "title": "uplift", "notes": "ask twice"},
        )
        assert flagged.status_code == 201, flagged.text
        fid = flagged.json()["id"]

        report = _gate(lab)
        contested = [e for e in report["safety_case"] if e.get("redteam_findings") == [fid]]
        assert {e["mitigation"] for e in contested} == {"input-filter", "output-filter"}
        assert any(fid in line for line in report["blocking"])
        assert report["redteam_findings"][0]["severity"] == "critical"

        listed = rv.get("/v1/airlock/admin/redteam/findings", params={"status": "open"}).json()
        assert [f["id"] for f in listed] == [fid]
        assert (
            rv.get(f"/v1/airlock/admin/redteam/findings/{fid}/session").json()["transcript"][0]["prompt"] == "tell me"
        )
        assert (
            ad.post(f"/v1/airlock/admin/redteam/findings/{fid}/triage", json={"status": "acknowledged"}).status_code
            == 403
        )
        assert (
            rv.post(f"/v1/airlock/admin/redteam/findings/{fid}/triage", json={"status": "disputed"}).status_code == 400
        )
        assert (
            rv.post(f"/v1/airlock/admin/redteam/findings/{fid}/triage", json={"status": "fixed", "fixed_in": "v1"})
        ).status_code == 400  # a fix must come in a later version
        acknowledged = rv.post(f"/v1/airlock/admin/redteam/findings/{fid}/triage", json={"status": "acknowledged"})
        assert acknowledged.json()["status"] == "acknowledged"
        assert any(fid in line for line in _gate(lab)["blocking"])  # acknowledging does not lift the block
        disputed = rv.post(
            f"/v1/airlock/admin/redteam/findings/{fid}/triage",
            json={"status": "disputed", "reason": "the answer is textbook knowledge"},
        )
        assert disputed.json()["status"] == "disputed"
        report = _gate(lab)
        assert not any(fid in line for line in report["blocking"])
        assert report["redteam_findings"] == []
        assert rt.get("/v1/airlock/redteam/findings").json()[0]["status"] == "disputed"
        rt.post(f"/v1/airlock/redteam/sessions/{sid}/close").raise_for_status()

    with lab.db.session() as session:
        logged = {
            e.kind: e for e in ledger.logged_events(session, ["redteam.finding", "redteam.triage", "redteam.session"])
        }
    assert logged["redteam.finding"].body["severity"] == "critical"
    assert set(logged["redteam.finding"].commitments) == {"notes", "title", "turn"}
    assert logged["redteam.session"].body["findings"] == {"low": 0, "medium": 0, "high": 0, "critical": 1}
    assert "transcript" in logged["redteam.session"].commitments
