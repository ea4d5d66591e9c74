"""Per-variant output caps: an oversized token budget is refused before any backend is reached."""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import FAKE_MANIFEST, HTTP_TIMEOUT, Lab, running_lab

MESSAGES = [{"role": "user", "content": "hello"}]


@pytest.fixture
def capped_lab(db: Any) -> Iterator[Lab]:
    """The fake manifest, with a cap of 8 on m1/helpful-only and a variant whose upstream is down."""
    manifest = copy.deepcopy(FAKE_MANIFEST)
    variants = manifest["models"][0]["versions"][0]["variants"]
    variants[1]["max_output_tokens"] = 8
    variants.append(
        {
            "name": "down",
            "backend": "openai_upstream",
            # Nothing listens on the discard port: serving this variant fails at the backend.
            "backend_config": {"base_url": "http://127.0.0.1:9/v1", "model": "x", "max_retries": 0},
        }
    )
    with running_lab(db, manifest) as lab:
        yield lab


def _post(lab: Lab, key: str, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(lab.url + path, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def _invalid_value(resp: httpx.Response, param: str) -> str:
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "invalid_value", param)
    return str(error["message"])


def test_a_billion_tokens_is_refused_before_the_backend(capped_lab: Lab) -> None:
    _gid, key = capped_lab.grant(variants=["down"])
    started = time.monotonic()
    message = _invalid_value(
        _post(capped_lab, key, "/v1/chat/completions", {"model": "m1/down", "messages": MESSAGES, "max_tokens": 10**9}),
        "max_tokens",
    )
    assert time.monotonic() - started < 5
    assert "4096" in message  # the default cap of a backend that names no context
    # Within the cap the same request reaches the (unreachable) backend: the 400 came first.
    within = _post(capped_lab, key, "/v1/chat/completions", {"model": "m1/down", "messages": MESSAGES, "max_tokens": 5})
    assert within.status_code in (502, 503), within.text
    row = next(r for r in capped_lab.audit_rows() if r.status_code == 400)
    assert (row.outcome, row.error_code, row.variant) == ("rejected", "invalid_value", "down")


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/v1/chat/completions", "max_tokens"),
        ("/v1/chat/completions", "max_completion_tokens"),
        ("/v1/completions", "max_tokens"),
    ],
)
def test_the_manifest_cap_is_enforced_per_variant(capped_lab: Lab, path: str, field: str) -> None:
    _gid, key = capped_lab.grant()
    body: dict[str, Any] = {"messages": MESSAGES} if "chat" in path else {"prompt": "one two"}
    assert _post(capped_lab, key, path, {**body, "model": "m1/helpful-only", field: 8}).status_code == 200
    message = _invalid_value(_post(capped_lab, key, path, {**body, "model": "m1/helpful-only", field: 9}), field)
    assert "at most 8" in message
    # The other variant of the same version keeps the default cap.
    assert _post(capped_lab, key, path, {**body, "model": "m1/production", field: 9}).status_code == 200


def test_the_cap_is_shown_to_the_evaluator(capped_lab: Lab) -> None:
    _gid, key = capped_lab.grant()
    headers = {"Authorization": f"Bearer {key}"}
    info = httpx.get(
        capped_lab.url + "/v1/airlock/models/m1/helpful-only", headers=headers, timeout=HTTP_TIMEOUT
    ).json()
    assert info["max_output_tokens"] == 8
    spec = httpx.get(capped_lab.url + "/openapi.json", timeout=HTTP_TIMEOUT).json()
    request = spec["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert request["max_tokens"]["maximum"] == 1 << 20
    assert "max_output_tokens" in request["max_tokens"]["description"]
