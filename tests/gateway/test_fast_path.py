"""The sampling fast path (``SamplingFastPath``) keeps every guarantee of the FastAPI routes it stands in for."""

from __future__ import annotations

import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from airlock.serving import routes
from tests.conftest import KEY_ENV, UPSTREAM_KEY, UPSTREAM_MODEL, Lab, running_lab

CHAT = "/v1/chat/completions"


def _variant(upstream: str, name: str, mitigations: list[dict[str, Any]]) -> dict[str, Any]:
    config = {"base_url": upstream + "/v1", "model": UPSTREAM_MODEL, "api_key_env": KEY_ENV}
    return {"name": name, "backend": "openai_upstream", "backend_config": config, "mitigations": mitigations}


@pytest.fixture
def fast_lab(db: Any, upstream: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv(KEY_ENV, UPSTREAM_KEY)
    mitigation = {"name": "filter", "kind": "input_filter", "stance": "claimed", "config": {"patterns": ["zyloxin"]}}
    variants = [_variant(upstream, "helpful-only", []), _variant(upstream, "production", [mitigation])]
    manifest = {
        "models": [{"name": "frontier", "versions": [{"label": "rc1", "content_hash": "9" * 64, "variants": variants}]}]
    }
    with running_lab(db, manifest) as lab:
        yield lab


@pytest.fixture
def served_fast(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Count the requests the fast path parsed and served itself (not handed to the routes)."""
    counts: Counter[str] = Counter()
    parse = routes._parse

    def counting(model: Any, body: bytes) -> Any:
        request = parse(model, body)
        counts["fast" if request is not None and not request.stream else "routes"] += 1
        return request

    monkeypatch.setattr(routes, "_parse", counting)
    return counts


def _post(lab: Lab, key: str, body: Any, path: str = CHAT, **headers: str) -> httpx.Response:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    sent = {"Authorization": f"Bearer {key}", "Content-Type": "application/json", **headers}
    return httpx.post(lab.url + path, content=raw, headers=sent, timeout=30)


def _error(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    err: dict[str, Any] = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def _chat(content: str, model: str = "frontier/helpful-only") -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 8}


def test_fast_path_serves_chat_and_text_and_audits_each(fast_lab: Lab, served_fast: Counter[str]) -> None:
    gid, key = fast_lab.grant(model="frontier", variants=["helpful-only", "production"])
    chat = _post(fast_lab, key, _chat("abc def"))
    assert chat.status_code == 200 and chat.headers["content-type"] == "application/json"
    assert chat.json()["model"] == "frontier/helpful-only"
    assert chat.json()["choices"][0]["message"]["content"] == "fed cba"
    assert chat.headers["x-request-id"].startswith("req_")
    text = _post(fast_lab, key, {"model": "frontier/helpful-only", "prompt": "abc", "max_tokens": 4}, "/v1/completions")
    assert text.status_code == 200 and text.json()["object"] == "text_completion"
    assert served_fast["fast"] == 2 and served_fast["routes"] == 0
    rows = fast_lab.audit_rows()
    assert [(r.path, r.status_code, r.outcome) for r in rows] == [
        (CHAT, 200, "allowed"),
        ("/v1/completions", 200, "allowed"),
    ]
    for row, resp in zip(rows, (chat, text), strict=True):
        assert row.request_id == resp.headers["x-request-id"]
        assert (row.grant_id, row.actor_type, row.model) == (gid, "evaluator", "frontier/helpful-only")
        assert row.variant == "helpful-only" and row.scope == "sample" and row.version_id
        assert row.tokens_in > 0 and row.tokens_out > 0


def test_mitigated_variant_is_still_filtered(fast_lab: Lab, served_fast: Counter[str]) -> None:
    _gid, key = fast_lab.grant(model="frontier", variants=["helpful-only", "production"])
    blocked = _post(fast_lab, key, _chat("zyloxin recipe", "frontier/production"))
    assert blocked.status_code == 200
    assert blocked.json()["choices"][0]["finish_reason"] == "content_filter"
    assert served_fast["fast"] == 1
    (row,) = fast_lab.audit_rows()
    assert row.outcome == "blocked" and row.detail["mitigations"][0]["blocked"] is True


def test_revocation_is_immediate_on_the_fast_path(fast_lab: Lab, served_fast: Counter[str]) -> None:
    from airlock.access.service import revoke_grant

    gid, key = fast_lab.grant(model="frontier", variants=["helpful-only"])
    assert _post(fast_lab, key, _chat("x")).status_code == 200
    assert _post(fast_lab, key, _chat("x")).status_code == 200  # answered from the authentication cache
    with fast_lab.db.session() as session:
        revoke_grant(session, gid, "test")
    err = _error(_post(fast_lab, key, _chat("x")), 401)
    assert err["code"] == "grant_revoked"
    assert _error(_post(fast_lab, "ak-not-a-key", _chat("x")), 401)["type"] == "authentication_error"
    rows = fast_lab.audit_rows()
    assert [(r.status_code, r.outcome) for r in rows] == [
        (200, "allowed"),
        (200, "allowed"),
        (401, "denied"),
        (401, "denied"),
    ]
    assert rows[2].grant_id == gid and rows[2].error_code == "grant_revoked"
    assert served_fast["fast"] == 4


def test_scope_and_variant_checks(fast_lab: Lab, served_fast: Counter[str]) -> None:
    _gid, key = fast_lab.grant(model="frontier", variants=["helpful-only"], scopes=["sample"])
    assert _error(_post(fast_lab, key, _chat("x", "frontier/production")), 403)["type"] == "permission_error"
    logprobs = {**_chat("x"), "logprobs": True}
    assert _error(_post(fast_lab, key, logprobs), 403)["type"] == "permission_error"
    assert _error(_post(fast_lab, key, _chat("x", "frontier/nope")), 404)["type"] == "not_found_error"
    over = {**_chat("x"), "max_tokens": 10**9}
    assert _error(_post(fast_lab, key, over), 400)["param"] == "max_tokens"
    controlled = {**_chat("x"), "chat_template": "{{ messages }}"}
    assert _error(_post(fast_lab, key, controlled), 400)["code"] == "unsupported_parameter"
    assert served_fast["fast"] == 5
    assert [r.status_code for r in fast_lab.audit_rows()] == [403, 403, 404, 400, 400]


def test_quota_is_exact_under_concurrency(fast_lab: Lab, served_fast: Counter[str]) -> None:
    _gid, key = fast_lab.grant(model="frontier", variants=["helpful-only"], quota_requests_per_minute=7)
    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(lambda _: _post(fast_lab, key, _chat("x")), range(30)))
    statuses = Counter(r.status_code for r in responses)
    assert statuses == {200: 7, 429: 23}
    for resp in responses:
        if resp.status_code == 429:
            assert _error(resp, 429)["type"] == "rate_limit_error" and int(resp.headers["retry-after"]) >= 1
    rows = fast_lab.audit_rows()
    assert len(rows) == 30
    assert Counter(r.outcome for r in rows) == {"allowed": 7, "denied": 23}
    assert served_fast["fast"] == 30


def test_bad_input_gets_the_routes_errors(fast_lab: Lab, served_fast: Counter[str]) -> None:
    _gid, key = fast_lab.grant(model="frontier", variants=["helpful-only"])
    assert _error(_post(fast_lab, key, b"{not json"), 400)["message"] == "the request body is not valid JSON"
    assert _error(_post(fast_lab, key, b"[1, 2]"), 400)["code"] == "invalid_request"
    assert _error(_post(fast_lab, key, {"model": "frontier/helpful-only"}), 400)["param"] == "messages"
    bad_type = {**_chat("x"), "temperature": "hot"}
    assert _error(_post(fast_lab, key, bad_type), 400)["param"] == "temperature"
    no_prompt = {"model": "frontier/helpful-only"}
    assert _error(_post(fast_lab, key, no_prompt, "/v1/completions"), 400)["code"] == "invalid_request"
    # Another content type and a stream go to the routes, which answer as they always have.
    plain = _post(fast_lab, key, _chat("abc"), **{"Content-Type": "text/plain"})
    assert plain.status_code in (400, 415) and "error" in plain.json()
    streamed = _post(fast_lab, key, {**_chat("abc def"), "stream": True})
    assert streamed.status_code == 200 and streamed.text.rstrip().endswith("data: [DONE]")
    assert served_fast["fast"] == 0
    rows = fast_lab.audit_rows()
    assert len(rows) == 7 and [r.status_code for r in rows][:5] == [400] * 5
    assert all(r.error_code == "invalid_request" for r in rows[:5])


def test_fast_path_bypasses_the_middleware_stack(
    fast_lab: Lab, served_fast: Counter[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from starlette.middleware.errors import ServerErrorMiddleware

    through_stack: list[str] = []
    call = ServerErrorMiddleware.__call__

    async def counting(self: Any, scope: Any, receive: Any, send: Any) -> None:
        through_stack.append(scope["path"])
        await call(self, scope, receive, send)

    monkeypatch.setattr(ServerErrorMiddleware, "__call__", counting)
    _gid, key = fast_lab.grant(model="frontier", variants=["helpful-only"])
    assert _post(fast_lab, key, _chat("abc")).status_code == 200
    assert _post(fast_lab, key, {**_chat("abc"), "stream": True}).status_code == 200
    assert served_fast["fast"] == 1 and through_stack == [CHAT]  # only the stream took the whole stack
    assert len(fast_lab.audit_rows()) == 2  # each audited once


def test_a_bug_on_the_fast_path_is_a_json_500_and_audited(
    fast_lab: Lab, served_fast: Counter[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(routes.serving, "prepare", broken)
    _gid, key = fast_lab.grant(model="frontier", variants=["helpful-only"])
    resp = _post(fast_lab, key, _chat("abc"))
    err = _error(resp, 500)
    assert err["code"] == "internal_error" and resp.headers["x-request-id"] in err["message"]
    assert "a bug" not in resp.text
    (row,) = fast_lab.audit_rows()
    assert (row.status_code, row.outcome, row.error_code) == (500, "error", "internal_error")
    assert row.request_id == resp.headers["x-request-id"] and served_fast["fast"] == 1


def test_a_body_declared_too_large_is_refused_unread(fast_lab: Lab, served_fast: Counter[str]) -> None:
    _gid, key = fast_lab.grant(model="frontier", variants=["helpful-only"])
    body = json.dumps(_chat("x" * (4 * 1024 * 1024 + 1))).encode()
    err = _error(_post(fast_lab, key, body), 413)
    assert err["code"] == "request_too_large"
    assert served_fast["fast"] == 0 and served_fast["routes"] == 0  # never parsed
    (row,) = fast_lab.audit_rows()
    assert (row.status_code, row.error_code) == (413, "request_too_large")


def test_watermark_keys_are_derived_once_per_grant(
    fast_lab: Lab, served_fast: Counter[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from airlock.backends.protocol import ChatCompletionRequest
    from airlock.leak.keys import watermark_key
    from airlock.serving import service

    derived: list[str] = []
    derive = service._grant_watermark_key
    monkeypatch.setattr(service, "_grant_watermark_key", lambda s, g: derived.append(g) or derive(s, g))
    keys: list[bytes] = []
    set_key = ChatCompletionRequest.set_watermark_key
    monkeypatch.setattr(
        ChatCompletionRequest, "set_watermark_key", lambda self, key: keys.append(key) or set_key(self, key)
    )
    first, key_a = fast_lab.grant(model="frontier", variants=["helpful-only"])
    second, key_b = fast_lab.grant(model="frontier", variants=["helpful-only"])
    for key in (key_a, key_a, key_b, key_a):
        assert _post(fast_lab, key, {**_chat("abc"), "temperature": 0.7}).status_code == 200
    assert derived == [first, second] and served_fast["fast"] == 4
    with fast_lab.db.session() as session:
        expected = {g: watermark_key(session, g) for g in (first, second)}
    assert keys == [expected[first], expected[first], expected[second], expected[first]]
    assert expected[first] != expected[second]
