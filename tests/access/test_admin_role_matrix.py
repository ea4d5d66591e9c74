"""Every lab role × every admin route gives the expected answer, each denial audited; the role attacks fail."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute, iter_route_contexts
from sqlalchemy import func, select
from typer.testing import CliRunner

from airlock.access import roles
from airlock.access.models import AdminToken, ApiKey, Grant
from airlock.access.roles import Permission, Role
from airlock.access.service import create_admin_token, get_grant, hash_secret
from airlock.app import create_app
from airlock.db import Database
from airlock.deps import RequirePermission, get_admin
from airlock.errors import InvalidRequestError
from tests.conftest import FAKE_MANIFEST, Lab, sqlite_lab

A, R, D, U = "admin", "reviewer", "decider", "auditor"
EVERYONE = {A, R, D, U}
ADMIN = "/v1/airlock/admin"
GATE = "/v1/airlock/gate"

# The policy, written out independently of airlock.access.roles: who may call each admin route.
EXPECTED: dict[tuple[str, str], set[str]] = {
    ("POST", f"{ADMIN}/evaluators"): {A},
    ("GET", f"{ADMIN}/evaluators"): {A, U},
    ("POST", f"{ADMIN}/grants"): {A},
    ("GET", f"{ADMIN}/grants"): {A, U},
    ("GET", f"{ADMIN}/grants/{{grant_id}}"): {A, U},
    ("POST", f"{ADMIN}/grants/{{grant_id}}/revoke"): {A},
    ("POST", f"{ADMIN}/grants/{{grant_id}}/keys"): {A},
    ("POST", f"{ADMIN}/keys/{{key_id}}/revoke"): {A},
    ("GET", f"{ADMIN}/audit"): {A, U},
    ("POST", f"{ADMIN}/manifest"): {A},
    ("GET", f"{ADMIN}/models"): EVERYONE,
    ("POST", f"{ADMIN}/models/{{model}}/versions/{{label}}/stage"): {A, D},
    ("GET", f"{ADMIN}/results"): EVERYONE,
    ("GET", f"{ADMIN}/results/elicitation"): EVERYONE,
    ("GET", f"{ADMIN}/reports"): {A, R, U},
    ("GET", f"{ADMIN}/reports/{{report_id}}"): {A, R, U},
    ("POST", f"{ADMIN}/reports/{{report_id}}/comments"): {R},
    ("POST", f"{ADMIN}/reports/{{report_id}}/agree-release"): {R},
    ("POST", f"{ADMIN}/reports/{{report_id}}/extend"): {A, D},
    ("POST", f"{ADMIN}/ledger/checkpoint"): {A, U},
    ("GET", f"{GATE}/policy"): EVERYONE,
    ("GET", f"{GATE}/models/{{model}}/versions/{{label}}"): EVERYONE,
    ("POST", f"{GATE}/models/{{model}}/versions/{{label}}/promote"): {A, D},
    ("GET", f"{GATE}/models/{{model}}/versions/{{label}}/history"): EVERYONE,
    ("GET", f"{GATE}/decisions/{{decision_id}}"): EVERYONE,
    ("GET", f"{GATE}/models/{{model}}/trend"): EVERYONE,
    ("GET", "/v1/airlock/interp/review"): {R, U},
    ("GET", "/v1/airlock/interp/review/{job_id}"): {R, U},
    ("POST", "/v1/airlock/interp/review/{job_id}"): {R},
    ("GET", f"{ADMIN}/redteam/findings"): {A, R, U},
    ("GET", f"{ADMIN}/redteam/findings/{{finding_id}}/session"): {A, R, U},
    ("POST", f"{ADMIN}/redteam/findings/{{finding_id}}/triage"): {R},
    ("GET", f"{ADMIN}/contamination/checks"): {A, U},
    ("GET", f"{ADMIN}/contamination/registrations"): {A, U},
    ("POST", f"{ADMIN}/contamination/checks"): {A},
    ("POST", f"{ADMIN}/contamination/checks/{{check_id}}/result"): {A},
    # Sealed items: metadata, and the content of items their evaluators released (the lab cannot open the rest).
    ("GET", f"{ADMIN}/sealed"): {A, R, U},
    ("GET", f"{ADMIN}/sealed/{{item_id}}"): {A, R, U},
    ("GET", f"{ADMIN}/sealed/{{item_id}}/content"): {A, R, U},
}
ISSUING = {("POST", f"{ADMIN}/grants"), ("POST", f"{ADMIN}/grants/{{grant_id}}/keys")}
APPROVING = {
    ("POST", "/v1/airlock/interp/review/{job_id}"),
    ("POST", f"{ADMIN}/reports/{{report_id}}/agree-release"),
    ("POST", f"{ADMIN}/redteam/findings/{{finding_id}}/triage"),
}
# Path parameters: real names where a read can succeed, missing ids elsewhere (writes then stop at 404).
PATH_VALUES = defaultdict(lambda: "missing", {"model": "m1", "label": "v1", "grant_id": "grant_missing"})


def _calls(dependant: Any) -> Iterator[Any]:
    for dep in dependant.dependencies:
        yield dep.call
        yield from _calls(dep)


def admin_routes(app: FastAPI) -> dict[tuple[str, str], list[Permission]]:
    """Every (method, path) of ``app`` that authenticates a lab token, with the permissions it requires."""
    found: dict[tuple[str, str], list[Permission]] = {}
    for route in iter_route_contexts(app.routes):  # flattens included routers, prefixes applied
        if not isinstance(route.original_route, APIRoute) or route.path is None:
            continue
        calls = list(_calls(route.dependant))
        if get_admin not in calls:
            continue
        needs = [call.permission for call in calls if isinstance(call, RequirePermission)]
        for method in sorted(route.methods or ()):
            found[(method, route.path)] = needs
    return found


# Taken from the application's own route table, so a new admin route is a new case here.
ROUTES = admin_routes(create_app(db=Database("sqlite://"), sync_manifest=False))


@pytest.fixture(scope="module")
def matrix_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lab, dict[str, str]]]:
    """One lab for the whole matrix, with a token per role (plus one stored under a role no longer known)."""
    from airlock.config import reset_settings

    directory = tmp_path_factory.mktemp("roles")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AIRLOCK_HOME", str(directory / "home"))
        for var in ("AIRLOCK_DATABASE_URL", "AIRLOCK_MANIFEST", "AIRLOCK_REDIS_URL", "AIRLOCK_POLICY"):
            patch.delenv(var, raising=False)
        reset_settings()
        with sqlite_lab(directory, FAKE_MANIFEST) as lab:
            tokens = {"admin": lab.admin_token}
            with lab.db.session() as session:
                for role in (R, D, U):
                    tokens[role] = create_admin_token(session, f"matrix-{role}", role)[1]
                # Rows written before roles were checked: "admin" keeps working, an unknown role gets nothing.
                for role in ("admin", "ceo"):
                    token = f"at_legacy_{role}"
                    session.add(
                        AdminToken(
                            name=f"legacy-{role}", role=role, token_hash=hash_secret(token), display_prefix="at_"
                        )
                    )
                    tokens[f"legacy-{role}"] = token
            tokens["evaluator"] = lab.grant("org-matrix")[1]
            yield lab, tokens
    reset_settings()


def _role_of(caller: str) -> str:
    return {"legacy-admin": "admin", "legacy-ceo": "ceo"}.get(caller, caller)


def _name_of(caller: str) -> str:
    return "test-admin" if caller == "admin" else caller if caller.startswith("legacy-") else f"matrix-{caller}"


def test_every_admin_route_has_a_matrix_entry_and_one_permission() -> None:
    assert set(ROUTES) == set(EXPECTED), (
        f"routes without a matrix entry: {sorted(set(ROUTES) - set(EXPECTED))}; "
        f"entries without a route: {sorted(set(EXPECTED) - set(ROUTES))}"
    )
    unchecked = {route: needs for route, needs in ROUTES.items() if len(needs) != 1}
    assert not unchecked, f"admin routes must require exactly one permission: {unchecked}"


def test_no_role_both_issues_access_and_approves_its_work() -> None:
    for role in EVERYONE:
        allowed = {route for route, who in EXPECTED.items() if role in who}
        assert not (allowed & ISSUING and allowed & APPROVING), role
    assert roles.separation_conflicts(roles.ROLE_PERMISSIONS) == []
    widened = {**roles.ROLE_PERMISSIONS, Role.REVIEWER: roles.ROLE_PERMISSIONS[Role.REVIEWER] | {Permission.KEYS_ISSUE}}
    assert roles.separation_conflicts(widened) == [Role.REVIEWER]


@pytest.mark.parametrize("route", sorted(ROUTES), ids=lambda r: f"{r[0]} {r[1]}")
def test_role_matrix(route: tuple[str, str], matrix_lab: tuple[Lab, dict[str, str]]) -> None:
    lab, tokens = matrix_lab
    method, template = route
    path = template.format_map(PATH_VALUES)
    sent: dict[str, tuple[str, httpx.Response]] = {}
    with httpx.Client(base_url=lab.url, timeout=30) as http:
        for caller, token in tokens.items():
            resp = http.request(
                method, path, json={} if method == "POST" else None, headers={"Authorization": f"Bearer {token}"}
            )
            sent[resp.headers["x-request-id"]] = (caller, resp)
    rows = {row.request_id: row for row in lab.audit_rows() if row.request_id in sent}
    assert set(rows) == set(sent), "every request is audited"
    (permission,) = ROUTES[route]
    for request_id, (caller, resp) in sent.items():
        row, role = rows[request_id], _role_of(caller)
        if caller == "evaluator":
            assert resp.status_code == 401 and row.outcome == "denied", resp.text
            continue
        assert row.actor_type == "admin" and row.actor == _name_of(caller)
        assert row.detail["role"] == role and row.detail["permission"] == permission.value
        if role in EXPECTED[route]:
            assert resp.status_code not in (401, 403) and resp.status_code < 500, (caller, resp.text)
            assert row.error_code != "role_not_allowed"
            continue
        assert resp.status_code == 403, (caller, resp.text)
        error = resp.json()["error"]
        assert error["code"] == "role_not_allowed" and error["type"] == "permission_error"
        assert f"role {role!r} may not" in error["message"]
        assert all(f"'{who}'" in error["message"] for who in EXPECTED[route]), error["message"]
        assert (row.status_code, row.outcome, row.error_code) == (403, "denied", "role_not_allowed")
        assert row.detail["denied"] == error["message"]


# ---------------------------------------------------------------- the attacks


def _token(lab: Lab, name: str, role: str) -> tuple[str, str]:
    with lab.db.session() as session:
        row, token = create_admin_token(session, name, role)
        return row.id, token


def _as(lab: Lab, token: str) -> httpx.Client:
    return httpx.Client(base_url=lab.url, headers={"Authorization": f"Bearer {token}"}, timeout=30)


def _count(lab: Lab, model: Any) -> int:
    with lab.db.session() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


GRANT_BODY = {"evaluator": "org-a", "model": "m1", "variants": ["production"], "scopes": ["sample", "interp"]}


def test_reviewer_and_decider_cannot_issue_or_revoke_access(lab: Lab) -> None:
    own_grant, _own_key = lab.grant("org-a")
    other_grant, other_key = lab.grant("org-b")
    with lab.db.session() as session:
        other_key_id = get_grant(session, other_grant).keys[0].id
    grants, keys = _count(lab, Grant), _count(lab, ApiKey)
    _rid, reviewer = _token(lab, "rita", R)
    _did, decider = _token(lab, "dora", D)
    _uid, auditor = _token(lab, "aude", U)
    attempts = []
    with _as(lab, reviewer) as http:
        attempts += [
            http.post(f"{ADMIN}/grants", json=GRANT_BODY),
            http.post(f"{ADMIN}/grants/{own_grant}/keys", json={"name": "mine"}),
            http.post(f"{ADMIN}/grants/{other_grant}/revoke", json={"reason": "not yours"}),
            http.post(f"{ADMIN}/keys/{other_key_id}/revoke"),
        ]
    for token in (decider, auditor):
        with _as(lab, token) as http:
            attempts += [http.post(f"{ADMIN}/grants", json=GRANT_BODY)]
    for resp in attempts:
        assert resp.status_code == 403 and resp.json()["error"]["code"] == "role_not_allowed", resp.text
    assert (_count(lab, Grant), _count(lab, ApiKey)) == (grants, keys)
    with lab.db.session() as session:
        assert get_grant(session, other_grant).revoked_at is None
    assert _as(lab, other_key).get("/v1/models").status_code == 200  # org-b's access is untouched
    denials = [r for r in lab.audit_rows() if r.error_code == "role_not_allowed"]
    assert sorted(r.detail["role"] for r in denials) == ["auditor", "decider"] + ["reviewer"] * 4
    assert {r.actor for r in denials} == {"rita", "dora", "aude"} and all(r.detail["denied"] for r in denials)

    # The admin role may: the grant remembers which token issued it.
    with _as(lab, lab.admin_token) as http:
        created = http.post(f"{ADMIN}/grants", json=GRANT_BODY)
    assert created.status_code == 201, created.text
    with lab.db.session() as session:
        issuer = session.scalar(select(AdminToken.id).where(AdminToken.name == "test-admin"))
        assert get_grant(session, created.json()["id"]).issued_by_token_id == issuer


def _held_interp_job(lab: Lab, grant_id: str) -> str:
    """A succeeded interp job whose result waits for review (rows only: no sandbox needed)."""
    from airlock.interp.models import InterpJob
    from airlock.jobs.models import Job

    job_id = f"ijob_{grant_id[-8:]}"
    with lab.db.session() as session:
        grant = get_grant(session, grant_id)
        session.add(
            Job(id=job_id, kind="interp", evaluator_id=grant.evaluator_id, grant_id=grant_id, status="succeeded")
        )
        session.flush()
        session.add(
            InterpJob(
                id=job_id,
                evaluator_id=grant.evaluator_id,
                grant_id=grant_id,
                model="m1/production",
                version_id=grant.version_ids[0],
                variant_id="var_test",
                filename="probe.py",
                entry_point="main",
                code_sha256="0" * 64,
                code_bytes=1,
                review_state="pending",
                review_reasons=["result exceeds the review threshold"],
            )
        )
    return job_id


def test_interp_approval_needs_a_reviewer_who_did_not_issue_the_grant(lab: Lab) -> None:
    issuer_id, issuing_reviewer = _token(lab, "ivy", R)
    _other_id, reviewer = _token(lab, "rita", R)
    # A grant recorded as issued by a reviewer token: the matrix forbids that, this is defence in depth.
    grant_id, _key = lab.grant("org-a", scopes=["interp"], issued_by_token_id=issuer_id)
    job_id = _held_interp_job(lab, grant_id)
    review = f"/v1/airlock/interp/review/{job_id}"

    refused = _as(lab, lab.admin_token).post(review, json={"decision": "approve"})
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "role_not_allowed"
    assert "'reviewer'" in refused.json()["error"]["message"]
    own = _as(lab, issuing_reviewer).post(review, json={"decision": "approve"})
    assert own.status_code == 403 and own.json()["error"]["code"] == "issuer_cannot_review", own.text
    approved = _as(lab, reviewer).post(review, json={"decision": "approve"})
    assert approved.status_code == 200 and approved.json()["review"]["state"] == "approved", approved.text
    rows = {r.error_code: r for r in lab.audit_rows() if r.path == review}
    assert rows["role_not_allowed"].detail["role"] == "admin"
    assert rows["issuer_cannot_review"].actor == "ivy" and rows["issuer_cannot_review"].outcome == "denied"
    assert rows["issuer_cannot_review"].detail["denied"].startswith("this token issued grant")


def test_report_release_needs_a_reviewer_who_did_not_issue_the_grant(lab: Lab, tmp_path: Path) -> None:
    from tests.publish.report_fixtures import make_org

    issuer_id, issuing_reviewer = _token(lab, "ivy", R)
    _other_id, reviewer = _token(lab, "rita", R)
    org = make_org(lab.db, tmp_path, issued_by_token_id=issuer_id)
    result_id = org.attest(lab.db)
    with _as(lab, org.token) as http:
        body = {"model": "m1@v1", "title": "t", "body": "b", "result_ids": [result_id]}
        report_id = http.post("/v1/airlock/reports", json=body).json()["id"]
        assert http.post(f"/v1/airlock/reports/{report_id}/submit").status_code == 200
    agree = f"{ADMIN}/reports/{report_id}/agree-release"
    assert _as(lab, lab.admin_token).post(agree).json()["error"]["code"] == "role_not_allowed"
    own = _as(lab, issuing_reviewer).post(agree)
    assert own.status_code == 403 and own.json()["error"]["code"] == "issuer_cannot_review", own.text
    assert _as(lab, issuing_reviewer).post(f"{ADMIN}/reports/{report_id}/comments", json={"body": "ok"}).is_success
    agreed = _as(lab, reviewer).post(agree)
    assert agreed.status_code == 200 and agreed.json()["release"]["agreed_revision"] == 1, agreed.text


# ---------------------------------------------------------------- token creation and the CLI


def test_unknown_roles_are_refused_at_token_creation(db: Any) -> None:
    with db.session() as session:
        with pytest.raises(InvalidRequestError, match="unknown lab role 'superuser'") as caught:
            create_admin_token(session, "eve", "superuser")
        assert caught.value.code == "unknown_role"
        row, _token = create_admin_token(session, "aude", " auditor ")
        assert row.role == "auditor"
        assert session.scalar(select(func.count()).select_from(AdminToken)) == 1


def test_cli_token_roles_and_role_refusal(airlock_env: Path) -> None:
    import yaml

    from airlock.cli import app

    runner = CliRunner(env={"COLUMNS": "250"})  # one error line, unwrapped
    assert runner.invoke(app, ["init", "--no-admin-token"]).exit_code == 0
    (airlock_env / "airlock.yaml").write_text(yaml.safe_dump(FAKE_MANIFEST))
    assert runner.invoke(app, ["models", "sync"]).exit_code == 0
    bad = runner.invoke(app, ["admin", "token", "eve", "--role", "superuser"])
    assert bad.exit_code == 1 and "unknown lab role 'superuser'" in bad.output
    assert "admin, reviewer, decider, auditor" in bad.output and "Traceback" not in bad.output
    made = runner.invoke(app, ["admin", "token", "rita", "--role", "reviewer"])
    assert made.exit_code == 0 and made.output.strip().startswith("at_")
    # A command acting for a token applies the token's role, with the same message as the HTTP API.
    promote = ["gate", "promote", "m1@v1", "--stage", "internal"]
    refused = runner.invoke(app, promote, env={"AIRLOCK_ADMIN_TOKEN": made.output.strip()})
    assert refused.exit_code == 1 and "role 'reviewer' may not change a version's stage" in refused.output
    assert "'admin' or 'decider'" in refused.output
