"""Promotion through the gate: refusals are recorded, overrides need a decider, no bypass via the API or CLI."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from airlock.cli import app
from airlock.errors import ConflictError, InvalidRequestError, PermissionDeniedError
from airlock.governance.models import GateDecision, Override
from airlock.governance.policy import parse_policy
from airlock.governance.service import GateBlockedError, OverrideRequest, promote
from airlock.registry.models import ModelVersion
from tests.conftest import FAKE_MANIFEST, HTTP_TIMEOUT, running_lab
from tests.governance.gate_helpers import POLICY, Evidence, sync, write_policy

runner = CliRunner()
JUSTIFICATION = "Bio proxy evidence is weak but the model is tiny; shipping to a closed pilot only."


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict[str, Any]]]:
    """Capture ledger events (the ledger's own tests cover what it does with them)."""
    seen: list[tuple[str, dict[str, Any]]] = []

    def record(session: Any, kind: str, body: dict[str, Any], *, confidential: Any = None) -> None:
        seen.append((kind, body))

    # Every package's events module calls the ledger through its module attribute: one patch sees them all.
    monkeypatch.setattr("airlock.ledger.service.record_event", record)
    return seen


def _version(session: Any) -> ModelVersion:
    from airlock.registry.service import get_model, get_version

    return get_version(session, get_model(session, "m1"), "v1")


def test_blocked_promotion_is_recorded_and_refused(db: Any, tmp_path: Path, events: list[Any]) -> None:
    sync(db)
    Evidence(db, tmp_path).submit("knowledge_proxy", 65, 100)  # cannot rule out
    policy = parse_policy(POLICY)
    events.clear()
    with db.session() as session:
        outcome = promote(session, _version(session), "deployed", actor="alice", policy=policy)
    assert not outcome.promoted and "the gate blocks m1@v1 -> deployed" in outcome.message
    with pytest.raises(GateBlockedError) as info:
        outcome.raise_if_refused()
    assert info.value.status_code == 409 and info.value.code == "gate_blocked"
    with db.session() as session:
        assert _version(session).stage == "external-candidate"
        decision = session.scalars(select(GateDecision)).one()
        assert (decision.decision, decision.promoted, decision.actor) == ("block", False, "alice")
        assert decision.report["report_sha256"] == decision.report_sha256
    assert [k for k, _ in events] == ["gate.decision"]
    assert events[0][1]["decision"] == "block" and events[0][1]["domains"]["bio"] == "cannot_rule_out"


def test_override_needs_decider_role_and_justification(db: Any, events: list[Any]) -> None:
    sync(db)
    events.clear()
    policy = parse_policy(POLICY)
    with db.session() as session:
        version = _version(session)
        with pytest.raises(PermissionDeniedError, match="only the policy's decider role"):
            promote(
                session,
                version,
                "deployed",
                actor="a",
                policy=policy,
                override=OverrideRequest("alice", "admin", JUSTIFICATION),
            )
        with pytest.raises(InvalidRequestError, match="justification"):
            promote(
                session,
                version,
                "deployed",
                actor="d",
                policy=policy,
                override=OverrideRequest("dora", "decider", "  because  "),
            )
        outcome = promote(
            session,
            version,
            "deployed",
            actor="dora",
            policy=policy,
            override=OverrideRequest("dora", "decider", JUSTIFICATION, "adm_1"),
        )
    assert outcome.promoted and outcome.override is not None
    with db.session() as session:
        assert _version(session).stage == "deployed"
        row = session.scalars(select(Override)).one()
        assert (row.decider, row.decider_role, row.justification) == ("dora", "decider", JUSTIFICATION)
        assert any("mitigation production/input-filter" in b for b in row.blocking)
        assert session.get(GateDecision, row.decision_id).promoted  # type: ignore[union-attr]
    kinds = [k for k, _ in events]
    assert kinds == ["gate.decision", "gate.override", "stage.changed"]
    assert events[1][1]["justification"] == JUSTIFICATION and events[1][1]["decider"] == "dora"
    assert (events[2][1]["from"], events[2][1]["to"]) == ("external-candidate", "deployed")


def test_ungated_stages_and_missing_policy(db: Any, events: list[Any]) -> None:
    sync(db)
    events.clear()
    with db.session() as session:
        version = _version(session)
        assert promote(session, version, "internal", actor="a", policy=parse_policy(POLICY)).promoted
        # Fail closed: without a policy nothing may be deployed, other stages still move.
        with pytest.raises(ConflictError, match="cannot be deployed without one"):
            promote(session, version, "deployed", actor="a", policy=None)
        assert promote(session, version, "training-checkpoint", actor="a", policy=None).promoted
    # Ungated moves record no gate decision, but every stage change is on the record.
    assert [(k, b["from"], b["to"]) for k, b in events] == [
        ("stage.changed", "external-candidate", "internal"),
        ("stage.changed", "internal", "training-checkpoint"),
    ]


def _admin(lab: Any, token: str | None = None) -> httpx.Client:
    return httpx.Client(
        base_url=lab.url + "/v1/airlock",
        headers={"Authorization": f"Bearer {token or lab.admin_token}"},
        timeout=HTTP_TIMEOUT,
    )


def test_admin_api_cannot_bypass_the_gate(db: Any, airlock_env: Path, tmp_path: Path, events: list[Any]) -> None:
    from airlock.access.service import create_admin_token

    write_policy(airlock_env / "policy.yaml")
    with running_lab(db, FAKE_MANIFEST) as lab:
        Evidence(db, tmp_path).submit("knowledge_proxy", 5, 100)
        admin = _admin(lab)
        resp = admin.post("/admin/models/m1/versions/v1/stage", json={"stage": "deployed"})
        assert resp.status_code == 409 and resp.json()["error"]["code"] == "gate_blocked", resp.text
        assert "production/input-filter: no_evidence" in resp.json()["error"]["message"]
        resp = admin.post("/gate/models/m1/versions/v1/promote", json={"stage": "deployed"})
        assert resp.status_code == 409
        # A manifest cannot move the version either.
        manifest = copy.deepcopy(FAKE_MANIFEST)
        manifest["models"][0]["versions"][0]["stage"] = "deployed"
        resp = admin.post("/admin/manifest", json=manifest)
        assert resp.status_code == 409 and resp.json()["error"]["code"] == "gated_stage"
        # An override from a non-decider is a 403; from a decider it goes through and is recorded.
        resp = admin.post(
            "/admin/models/m1/versions/v1/stage", json={"stage": "deployed", "justification": JUSTIFICATION}
        )
        assert resp.status_code == 403 and resp.json()["error"]["code"] == "not_decider"
        with db.session() as session:
            _row, decider_token = create_admin_token(session, "dora", "decider")
        decider = _admin(lab, decider_token)
        resp = decider.post(
            "/gate/models/m1/versions/v1/promote",
            json={"stage": "deployed", "override": {"justification": "short"}},
        )
        assert resp.status_code == 400 and resp.json()["error"]["code"] == "justification_required"
        resp = decider.post(
            "/gate/models/m1/versions/v1/promote",
            json={"stage": "deployed", "override": {"justification": JUSTIFICATION}},
        )
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["stage"] == "deployed" and body["decision"]["override"]["decider"] == "dora"
        history = admin.get("/gate/models/m1/versions/v1/history").json()
        assert [(h["decision"], h["promoted"], h["actor"]) for h in history] == [
            ("block", False, "test-admin"),
            ("block", False, "test-admin"),
            ("block", True, "dora"),
        ]
        assert history[2]["override"]["justification"] == JUSTIFICATION
        report = admin.get(f"/gate/decisions/{history[2]['id']}").json()
        assert report["report_sha256"] == history[2]["report_sha256"]
        assert [k for k, _ in events].count("gate.override") == 1


def test_gate_api_report_and_errors(db: Any, airlock_env: Path, tmp_path: Path) -> None:
    with running_lab(db, FAKE_MANIFEST) as lab:
        admin = _admin(lab)
        resp = admin.get("/gate/models/m1/versions/v1")
        assert resp.status_code == 409 and resp.json()["error"]["code"] == "no_policy"
        airlock_env.mkdir(parents=True, exist_ok=True)
        (airlock_env / "policy.yaml").write_text("version: 2\n")
        resp = admin.get("/gate/models/m1/versions/v1")
        assert resp.status_code == 409 and resp.json()["error"]["code"] == "gate_unavailable"
        write_policy(airlock_env / "policy.yaml")
        Evidence(db, tmp_path).submit("knowledge_proxy", 5, 100)
        resp = admin.get("/gate/models/m1/versions/v1", params={"stage": "deployed"})
        assert resp.status_code == 200 and resp.json()["decision"] == "block"
        assert resp.json()["domains"][0]["verdict"] == "below"
        assert admin.get("/gate/models/m1/versions/v1", params={"stage": "moon"}).status_code == 400
        assert admin.get("/gate/models/nope/versions/v1").status_code == 404
        assert admin.get("/gate/models/m1/versions/v9").status_code == 404
        assert admin.get("/gate/decisions/gdec_missing").status_code == 404
        assert admin.get("/gate/policy").json()["policy"]["name"] == "test policy"
        assert httpx.get(lab.url + "/v1/airlock/gate/models/m1/versions/v1", timeout=HTTP_TIMEOUT).status_code == 401
        resp = admin.post("/gate/models/m1/versions/v1/promote", json={"stage": "deployed", "extra": 1})
        assert resp.status_code == 400


def test_cli_check_exit_codes_promote_override_history(airlock_env: Path, tmp_path: Path) -> None:
    from airlock.access.service import create_admin_token
    from airlock.config import get_settings
    from airlock.db import Database

    write_policy(airlock_env / "policy.yaml")
    db = Database(get_settings().db_url)
    db.migrate()
    sync(db)
    evidence = Evidence(db, tmp_path)
    evidence.submit("knowledge_proxy", 5, 100)
    with db.session() as session:
        _row, token = create_admin_token(session, "dora", "decider")
    db.dispose()

    result = runner.invoke(app, ["gate", "check", "m1@v1", "--stage", "deployed", "--out", str(tmp_path / "r.json")])
    assert result.exit_code == 1, result.output
    assert "BLOCK" in result.output and "below" in result.output and "no_evidence" in result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["decision"] == "block"
    result = runner.invoke(app, ["gate", "check", "m1@v1", "--json"])
    assert result.exit_code == 1 and json.loads(result.output)["report_sha256"] == report["report_sha256"]
    assert runner.invoke(app, ["gate", "check", "m1", "--stage", "deployed"]).exit_code == 2
    assert runner.invoke(app, ["gate", "check", "m1@v1", "--stage", "moon"]).exit_code == 2

    result = runner.invoke(app, ["gate", "promote", "m1@v1", "--stage", "deployed"])
    assert result.exit_code == 1 and "refused" in result.output
    result = runner.invoke(app, ["gate", "promote", "m1@v1", "--stage", "deployed", "--override", "--decider", "dora"])
    assert result.exit_code == 2
    args = ["gate", "promote", "m1@v1", "--stage", "deployed", "--override", "--decider", "dora"]
    result = runner.invoke(app, [*args, "--justification", JUSTIFICATION], env={"AIRLOCK_ADMIN_TOKEN": token})
    assert result.exit_code == 0, result.output
    assert "overridden by dora" in result.output
    result = runner.invoke(app, ["gate", "history", "m1@v1"], env={"COLUMNS": "250"})
    assert result.exit_code == 0 and "dora (decider)" in result.output and result.output.count("block") == 2

    # With the claims backed, the gate allows and check exits 0.
    evidence.submit("refusal_robustness", 100, 100, variant="production")
    result = runner.invoke(app, ["gate", "check", "m1@v1", "--stage", "deployed"])
    assert result.exit_code == 0, result.output
    assert "ALLOW" in result.output


def test_manifest_sync_from_the_cli_cannot_move_a_version_past_the_gate(db: Any, tmp_path: Path) -> None:
    import yaml

    from airlock.config import reset_settings

    sync(db)
    manifest = copy.deepcopy(FAKE_MANIFEST)
    manifest["models"][0]["versions"][0]["stage"] = "deployed"
    path = tmp_path / "airlock.yaml"
    path.write_text(yaml.safe_dump(manifest))
    write_policy(tmp_path / "policy.yaml")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AIRLOCK_DATABASE_URL", db.engine.url.render_as_string(hide_password=False))
        mp.setenv("AIRLOCK_POLICY", str(tmp_path / "policy.yaml"))
        reset_settings()
        result = runner.invoke(app, ["models", "sync", str(path)])
        reset_settings()
    assert result.exit_code == 1, result.output
    with db.session() as session:
        assert _version(session).stage == "external-candidate"
