"""Every grant scope × requested scope × variant × key state gives the expected status and an audit row."""

from __future__ import annotations

import itertools
from datetime import timedelta

import httpx

from airlock.access import service
from airlock.access.seal import seal_grant
from airlock.db import utcnow
from tests.conftest import HTTP_TIMEOUT, Lab

GRANTED = ["production", "helpful-only"]
VARIANTS = [*GRANTED, "base"]  # base exists but is never granted here
GRANT_SCOPES = {
    "sample": ["sample"],
    "sample+logprobs": ["sample", "logprobs"],
    "logprobs-only": ["logprobs"],
    "finetune": ["finetune"],
    "interp": ["interp"],
    "redteam": ["redteam"],
}
KEY_STATES = ["valid", "wrong-grant", "expired", "not-yet-valid", "revoked-key", "revoked-grant", "garbage", "missing"]
REQUESTS = ["sample", "logprobs"]


def expected_status(state: str, grant_scopes: list[str], variant: str, request: str) -> int:
    """The policy, written out independently of the implementation."""
    if state in ("garbage", "missing", "revoked-key", "revoked-grant"):
        return 401
    if state in ("expired", "not-yet-valid", "wrong-grant"):
        return 403
    if variant not in GRANTED:
        return 403
    needed = {"sample"} | ({"logprobs"} if request == "logprobs" else set())
    return 200 if needed <= set(grant_scopes) else 403


def make_key(lab: Lab, state: str, scopes: list[str]) -> str | None:
    now = utcnow()
    if state == "garbage":
        return "ak_" + "x" * 43
    if state == "missing":
        return None
    if state == "wrong-grant":
        return lab.grant("org-other", model="m2", variants=["production"], scopes=scopes)[1]
    kwargs = {}
    if state == "not-yet-valid":
        kwargs = {"not_before": now + timedelta(days=1), "not_after": now + timedelta(days=2)}
    grant_id, key = lab.grant("org-a", variants=GRANTED, scopes=scopes, **kwargs)
    with lab.db.session() as session:
        if state == "expired":  # keys cannot be issued on an expired grant: let this one lapse
            grant = service.get_grant(session, grant_id)
            grant.not_before, grant.not_after = now - timedelta(days=2), now - timedelta(days=1)
            seal_grant(session, grant)  # a change the lab made: sealed, unlike an edit in the database
        elif state == "revoked-grant":
            service.revoke_grant(session, grant_id, "matrix")
        elif state == "revoked-key":
            key_row = service.get_grant(session, grant_id).keys[0]
            service.revoke_api_key(session, key_row.id)
    return key


def test_authorization_matrix(lab: Lab) -> None:
    keys = {
        (state, name): make_key(lab, state, scopes)
        for state, (name, scopes) in itertools.product(KEY_STATES, GRANT_SCOPES.items())
    }
    failures = []
    sent = 0
    with httpx.Client(base_url=lab.url, timeout=HTTP_TIMEOUT) as http:
        for (state, scope_name), variant, request in itertools.product(keys, VARIANTS, REQUESTS):
            key = keys[(state, scope_name)]
            body: dict[str, object] = {"model": f"m1/{variant}", "messages": [{"role": "user", "content": "hi"}]}
            if request == "logprobs":
                body |= {"logprobs": True, "top_logprobs": 1}
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            resp = http.post("/v1/chat/completions", json=body, headers=headers)
            sent += 1
            want = expected_status(state, GRANT_SCOPES[scope_name], variant, request)
            if resp.status_code != want:
                failures.append((state, scope_name, variant, request, want, resp.status_code, resp.text[:200]))
            elif want != 200:
                assert set(resp.json()) == {"error"}
    assert not failures, "\n".join(map(str, failures))
    rows = [r for r in lab.audit_rows() if r.path == "/v1/chat/completions"]
    assert len(rows) == sent
    statuses = sorted(r.status_code for r in rows)
    assert statuses.count(200) == sum(
        expected_status(s, GRANT_SCOPES[n], v, r) == 200 for (s, n), v, r in itertools.product(keys, VARIANTS, REQUESTS)
    )
    for row in rows:
        assert row.outcome == ("allowed" if row.status_code == 200 else "denied")
        assert row.model is not None or row.status_code == 401
        if row.status_code in (200, 403):
            assert row.grant_id is not None and row.actor in ("org-a", "org-other")
        else:
            assert row.actor_type == "evaluator" and row.error_code is not None
    revoked = [r for r in rows if r.error_code in ("key_revoked", "grant_revoked")]
    assert revoked and all(r.actor == "org-a" and r.grant_id for r in revoked)  # revoked keys stay attributable
