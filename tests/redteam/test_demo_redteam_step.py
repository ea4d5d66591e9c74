"""The demo's red-teaming step against a lab with the fake manifest: session, finding, triage, console URL."""

from __future__ import annotations

import pytest

from airlock.access.service import create_admin_token
from airlock.demo import console, redteam_step
from airlock.ledger import service as ledger
from airlock.redteam.models import RedteamFinding, RedteamSession
from tests.conftest import Lab


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_demo_red_teams_side_by_side_and_the_lab_triages(lab: Lab) -> None:
    with lab.db.session() as session:
        reviewer = create_admin_token(session, "rita", "reviewer")[1]
    with console.capture() as captured:
        finding_id = redteam_step(lab.url, lab.admin_token, reviewer, "m1")
    out = captured.get()
    with lab.db.session() as session:
        finding = session.get(RedteamFinding, finding_id)
        assert finding is not None and (finding.status, finding.severity, finding.variant) == (
            "acknowledged",
            "high",
            "helpful-only",
        )
        red_session = session.get(RedteamSession, finding.session_id)
        assert red_session is not None and red_session.variants == ["production", "helpful-only"]
        assert red_session.turns == 1 and red_session.closed_at is not None
        kinds = [
            e.kind for e in ledger.logged_events(session, ["redteam.finding", "redteam.triage", "redteam.session"])
        ]
    assert sorted(kinds) == ["redteam.finding", "redteam.session", "redteam.triage"]
    assert f"{lab.url}/ui/redteam/sessions/{red_session.id}" in out and "acknowledged" in out
