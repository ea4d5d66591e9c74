"""The lab admin API: evaluators, grants, keys, manifest sync and audit over HTTP."""

from __future__ import annotations

import copy

import httpx

from tests.conftest import HTTP_TIMEOUT, Lab


def admin(lab: Lab) -> httpx.Client:
    return httpx.Client(
        base_url=lab.url + "/v1/airlock/admin",
        headers={"Authorization": f"Bearer {lab.admin_token}"},
        timeout=HTTP_TIMEOUT,
    )


def test_admin_flow(lab: Lab) -> None:
    a = admin(lab)
    assert a.post("/evaluators", json={"name": "Org B", "contact": "b@example.org"}).status_code == 201
    assert a.post("/evaluators", json={"name": "Org B"}).status_code == 409
    resp = a.post(
        "/grants",
        json={"evaluator": "Org B", "model": "m1", "variants": ["base"], "scopes": ["sample"], "expires_in": "7d"},
    )
    assert resp.status_code == 201, resp.text
    grant = resp.json()
    assert grant["status"] == "active" and grant["variants"] == ["base"]
    key = a.post(f"/grants/{grant['id']}/keys", json={"name": "ci"}).json()
    assert key["key"].startswith("ak_")
    models = httpx.get(
        lab.url + "/v1/models", headers={"Authorization": f"Bearer {key['key']}"}, timeout=HTTP_TIMEOUT
    ).json()
    assert [m["id"] for m in models["data"]] == ["m1/base", "m1@v1/base"]
    revoked = a.post(f"/grants/{grant['id']}/revoke", json={"reason": "done"}).json()
    assert revoked["status"] == "revoked"
    assert (
        httpx.get(
            lab.url + "/v1/models", headers={"Authorization": f"Bearer {key['key']}"}, timeout=HTTP_TIMEOUT
        ).status_code
        == 401
    )
    events = a.get("/audit", params={"limit": 100}).json()
    assert any(e["path"] == "/v1/airlock/admin/grants" and e["actor"] == "test-admin" for e in events)


def test_admin_rejects_bad_input(lab: Lab) -> None:
    a = admin(lab)
    a.post("/evaluators", json={"name": "Org C"})
    cases = [
        {"evaluator": "Org C", "model": "m1", "variants": ["base"], "scopes": ["root"]},
        {"evaluator": "Org C", "model": "m1", "variants": [], "scopes": ["sample"]},
        {"evaluator": "Org C", "model": "m1", "variants": ["base"], "scopes": ["sample"], "expires_in": "soon"},
        {"evaluator": "Org C", "model": "m1", "variants": ["base"], "scopes": ["sample"], "surprise": 1},
    ]
    for body in cases:
        resp = a.post("/grants", json=body)
        assert resp.status_code == 400, (body, resp.text)
        assert resp.json()["error"]["message"]
    assert a.post("/grants", json={**cases[0], "scopes": ["sample"], "variants": ["ghost"]}).status_code == 404
    assert a.post("/grants", json={**cases[0], "scopes": ["sample"], "evaluator": "ghost"}).status_code == 404
    assert a.post("/grants/grant_nope/revoke", json={}).status_code == 404


def test_admin_requires_admin_token(lab: Lab) -> None:
    _gid, key = lab.grant()
    for token in (None, key, "at_forged"):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        resp = httpx.get(lab.url + "/v1/airlock/admin/grants", headers=headers, timeout=HTTP_TIMEOUT)
        assert resp.status_code == 401


def test_manifest_sync_over_api(lab: Lab) -> None:
    a = admin(lab)
    doc = {
        "models": [
            {
                "name": "m3",
                "versions": [{"label": "v1", "content_hash": "c" * 64, "variants": [{"name": "x", "backend": "fake"}]}],
            }
        ]
    }
    report = a.post("/manifest", json=doc).json()
    assert "model m3" in report["created"]
    assert a.post("/manifest", json=doc).json()["created"] == []
    bad = a.post("/manifest", json={"models": [{"name": "bad name!", "versions": []}]})
    assert bad.status_code == 400 and "models.0" in bad.json()["error"]["message"]
    # A mitigation config that cannot be built is refused before anything is written.
    filtered = {"name": "x", "backend": "fake", "mitigations": [{"name": "f", "kind": "input_filter", "config": {}}]}
    bad_filter = copy.deepcopy(doc)
    bad_filter["models"][0]["name"] = "m4"
    bad_filter["models"][0]["versions"][0]["variants"] = [filtered]
    resp = a.post("/manifest", json=bad_filter)
    assert resp.status_code == 400 and resp.json()["error"]["message"].startswith("m4@v1/x: ")
    assert "m4" not in {m["name"] for m in a.get("/models").json()}
    models = {m["name"]: m for m in a.get("/models").json()}
    variants = {v["name"]: v for v in models["m1"]["versions"][0]["variants"]}
    assert [m["stance"] for m in variants["production"]["mitigations"]] == ["disabled_for_eval", "claimed", "claimed"]
    assert variants["helpful-only"]["mitigations"] == []
