"""The OpenAI-compatible gateway over real HTTP, with the openai SDK, on a fake backend."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import HTTP_TIMEOUT, Lab


def client(lab: Lab, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=lab.url + "/v1", api_key=key, max_retries=0)


def test_models_lists_only_granted_variants(lab: Lab) -> None:
    _gid, key = lab.grant(variants=["helpful-only"])
    ids = sorted(m.id for m in client(lab, key).models.list())
    assert ids == ["m1/helpful-only", "m1@v1/helpful-only"]


def test_chat_roundtrip_and_usage_audited(lab: Lab) -> None:
    gid, key = lab.grant()
    resp = client(lab, key).chat.completions.create(
        model="m1/helpful-only", messages=[{"role": "user", "content": "hello there"}]
    )
    assert resp.choices[0].message.content == "echo: hello there"
    assert resp.model == "m1/helpful-only"
    assert resp.usage is not None and resp.usage.completion_tokens == 3
    row = [r for r in lab.audit_rows() if r.path == "/v1/chat/completions"][-1]
    assert (row.grant_id, row.variant, row.outcome, row.status_code) == (gid, "helpful-only", "allowed", 200)
    assert (row.tokens_in, row.tokens_out) == (2, 3)
    assert row.scope == "sample"


def test_versioned_model_id(lab: Lab) -> None:
    _gid, key = lab.grant()
    resp = client(lab, key).chat.completions.create(
        model="m1@v1/helpful-only", messages=[{"role": "user", "content": "x"}]
    )
    assert resp.model == "m1@v1/helpful-only"


def test_production_applies_system_prompt_and_filters(lab: Lab) -> None:
    _gid, key = lab.grant()
    c = client(lab, key)
    ok = c.chat.completions.create(model="m1/production", messages=[{"role": "user", "content": "hi"}])
    assert ok.choices[0].message.content == "echo: [be safe] hi"
    blocked = c.chat.completions.create(
        model="m1/production", messages=[{"role": "user", "content": "how to make Zyloxin at home"}]
    )
    assert blocked.choices[0].finish_reason == "content_filter"
    assert "zyloxin" not in (blocked.choices[0].message.content or "").lower()
    out_blocked = c.chat.completions.create(
        model="m1/production", messages=[{"role": "user", "content": "say CANARY please"}]
    )
    assert out_blocked.choices[0].finish_reason == "content_filter"
    assert "CANARY" not in (out_blocked.choices[0].message.content or "")
    # The helpful-only variant has no filter.
    free = c.chat.completions.create(
        model="m1/helpful-only", messages=[{"role": "user", "content": "how to make Zyloxin at home"}]
    )
    assert free.choices[0].finish_reason == "stop"
    rows = [r for r in lab.audit_rows() if r.path == "/v1/chat/completions"]
    assert [r.outcome for r in rows] == ["allowed", "blocked", "blocked", "allowed"]
    assert rows[1].detail["mitigations"][0]["name"] == "input-filter"
    assert any(m["name"] == "output-filter" and m["blocked"] for m in rows[2].detail["mitigations"])


def test_streaming_chat_matches_non_streaming(lab: Lab) -> None:
    _gid, key = lab.grant()
    c = client(lab, key)
    stream = c.chat.completions.create(
        model="m1/helpful-only",
        messages=[{"role": "user", "content": "one two three"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage = "", None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage:
            usage = chunk.usage
    assert text == "echo: one two three"
    assert usage is not None and usage.completion_tokens == 4
    row = [r for r in lab.audit_rows() if r.path == "/v1/chat/completions"][-1]
    assert row.tokens_out == 4 and row.outcome == "allowed"


def test_completions_echo_logprobs(lab: Lab) -> None:
    _gid, key = lab.grant()
    resp = client(lab, key).completions.create(
        model="m1/helpful-only", prompt="a b c", max_tokens=0, echo=True, logprobs=1
    )
    lp = resp.choices[0].logprobs
    assert lp is not None and lp.token_logprobs is not None
    assert lp.token_logprobs[0] is None and lp.token_logprobs[1:] == [-1.0, -1.0]


def test_logprobs_need_the_logprobs_scope(lab: Lab) -> None:
    _gid, key = lab.grant(scopes=["sample"])
    c = client(lab, key)
    with pytest.raises(openai.PermissionDeniedError) as info:
        c.chat.completions.create(
            model="m1/helpful-only", messages=[{"role": "user", "content": "x"}], logprobs=True, top_logprobs=2
        )
    assert info.value.body["code"] == "scope_not_granted"  # type: ignore[index]


def _post(lab: Lab, key: str | None, body: Any, path: str = "/v1/chat/completions", **kw: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(
        lab.url + path,
        content=content,
        headers={**headers, "content-type": "application/json"},
        **kw,
        timeout=HTTP_TIMEOUT,
    )


def _is_openai_error(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and body["error"]["message"] and body["error"]["type"]
    return dict(body["error"])


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        ({"model": "m1/helpful-only"}, "messages"),
        ({"model": "m1/helpful-only", "messages": []}, "messages"),
        ({"model": "m1/helpful-only", "messages": [{"role": "wizard", "content": "x"}]}, "messages"),
        ({"model": "m1/helpful-only", "messages": [{"role": "user", "content": "x"}], "temperature": 9}, "temperature"),
        ({"model": "m1/helpful-only", "messages": [{"role": "user", "content": "x"}], "n": 0}, "n"),
        ({"model": "m1/helpful-only", "messages": [{"role": "user", "content": "x"}], "stop": ["a"] * 5}, "stop"),
        ({"model": "nonsense", "messages": [{"role": "user", "content": "x"}]}, "model"),
        ([1, 2, 3], None),
    ],
)
def test_malformed_requests_are_400(lab: Lab, body: Any, param: str | None) -> None:
    _gid, key = lab.grant()
    err = _is_openai_error(_post(lab, key, body), 400)
    assert err["type"] == "invalid_request_error"
    if param:
        assert err["param"] == param


def test_auth_and_lookup_errors(lab: Lab) -> None:
    _gid, key = lab.grant(variants=["helpful-only"])
    msg = {"messages": [{"role": "user", "content": "x"}]}
    assert _is_openai_error(_post(lab, None, {"model": "m1/helpful-only", **msg}), 401)["code"] == "missing_api_key"
    assert _is_openai_error(_post(lab, "ak_garbage", {"model": "m1/helpful-only", **msg}), 401)
    assert _is_openai_error(_post(lab, key, {"model": "m1/production", **msg}), 403)["code"] == "variant_not_granted"
    assert _is_openai_error(_post(lab, key, {"model": "m2/production", **msg}), 403)["code"] == "model_not_granted"
    assert _is_openai_error(_post(lab, key, {"model": "nope/production", **msg}), 404)
    assert _is_openai_error(_post(lab, key, {"model": "m1/nope", **msg}), 404)
    assert _is_openai_error(_post(lab, key, {"model": "m1@v9/helpful-only", **msg}), 404)
    assert _is_openai_error(httpx.get(lab.url + "/v1/nothing-here", timeout=HTTP_TIMEOUT), 404)
    rows = lab.audit_rows()
    assert len(rows) == 8
    assert [r.status_code for r in rows] == [401, 401, 403, 403, 404, 404, 404, 404]
    assert all(r.outcome in ("denied", "rejected") for r in rows)


def test_rate_limit_429_with_retry_after(lab: Lab) -> None:
    _gid, key = lab.grant(quota_requests_per_minute=2)
    body = {"model": "m1/helpful-only", "messages": [{"role": "user", "content": "x"}]}
    assert _post(lab, key, body).status_code == 200
    assert _post(lab, key, body).status_code == 200
    resp = _post(lab, key, body)
    err = _is_openai_error(resp, 429)
    assert err["type"] == "rate_limit_error" and int(resp.headers["retry-after"]) >= 1


def test_token_quota_429(lab: Lab) -> None:
    _gid, key = lab.grant(quota_total_tokens=5)
    body = {"model": "m1/helpful-only", "messages": [{"role": "user", "content": "one two three four"}]}
    assert _post(lab, key, body).status_code == 200  # 4 in + 6 out = 10 tokens
    lab.server.flush_audit()
    err = _is_openai_error(_post(lab, key, body), 429)
    assert err["code"] == "insufficient_quota"


def test_body_too_large_is_413(lab: Lab) -> None:
    _gid, key = lab.grant()
    big = {"model": "m1/helpful-only", "messages": [{"role": "user", "content": "x" * (5 * 1024 * 1024)}]}
    _is_openai_error(_post(lab, key, big), 413)


def test_revocation_is_immediate(lab: Lab) -> None:
    from airlock.access.service import revoke_grant

    gid, key = lab.grant()
    c = client(lab, key)
    c.chat.completions.create(model="m1/helpful-only", messages=[{"role": "user", "content": "x"}])
    with lab.db.session() as session:
        revoke_grant(session, gid, "test")
    with pytest.raises(openai.AuthenticationError) as info:
        c.chat.completions.create(model="m1/helpful-only", messages=[{"role": "user", "content": "x"}])
    assert info.value.body["code"] == "grant_revoked"  # type: ignore[index]


def test_healthz_and_openapi(lab: Lab) -> None:
    assert httpx.get(lab.url + "/healthz", timeout=HTTP_TIMEOUT).json()["status"] == "ok"
    spec = httpx.get(lab.url + "/openapi.json", timeout=HTTP_TIMEOUT).json()
    assert "/v1/chat/completions" in spec["paths"] and "/v1/airlock/admin/grants" in spec["paths"]


def test_unexpected_error_is_a_clean_500(lab: Lab) -> None:
    _gid, key = lab.grant()
    resp = _post(lab, key, {"model": "m1/helpful-only", "messages": [{"role": "user", "content": "TRIGGER_CRASH"}]})
    err = _is_openai_error(resp, 500)
    assert resp.headers["x-request-id"] in err["message"]
    assert "secret" not in resp.text and "Traceback" not in resp.text
    row = lab.audit_rows()[-1]
    assert (row.status_code, row.outcome, row.error_code) == (500, "error", "internal_error")


def test_evaluator_can_read_own_grant_and_variant_provenance(lab: Lab) -> None:
    gid, key = lab.grant(variants=["production"])
    headers = {"Authorization": f"Bearer {key}"}
    grant = httpx.get(lab.url + "/v1/airlock/grant", headers=headers, timeout=HTTP_TIMEOUT).json()
    assert (grant["grant_id"], grant["model"], grant["variants"], grant["status"]) == (
        gid,
        "m1",
        ["production"],
        "active",
    )
    info = httpx.get(lab.url + "/v1/airlock/models/m1/production", headers=headers, timeout=HTTP_TIMEOUT).json()
    assert info["version_hash"] == "a" * 64 and info["grant_id"] == gid and info["version"] == "v1"
    assert [(m["name"], m["stance"]) for m in info["mitigations"]] == [
        ("safety-prompt", "disabled_for_eval"),
        ("input-filter", "claimed"),
        ("output-filter", "claimed"),
    ]
    assert (
        httpx.get(lab.url + "/v1/airlock/models/m1/helpful-only", headers=headers, timeout=HTTP_TIMEOUT).status_code
        == 403
    )
    assert httpx.get(lab.url + "/v1/airlock/models/m1/nope", headers=headers, timeout=HTTP_TIMEOUT).status_code == 404
