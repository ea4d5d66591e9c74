"""A variant served by an OpenAI-compatible upstream in another process, through the whole gateway."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import openai
import pytest

from tests.conftest import KEY_ENV, UPSTREAM_KEY, UPSTREAM_MODEL, Lab, running_lab


@pytest.fixture
def upstream_lab(db: Any, upstream: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv(KEY_ENV, UPSTREAM_KEY)
    manifest = {
        "models": [
            {
                "name": "frontier",
                "versions": [
                    {
                        "label": "rc1",
                        "content_hash": "9" * 64,
                        "variants": [
                            {
                                "name": "helpful-only",
                                "backend": "openai_upstream",
                                "backend_config": {
                                    "base_url": upstream + "/v1",
                                    "model": UPSTREAM_MODEL,
                                    "api_key_env": KEY_ENV,
                                },
                            },
                            {
                                "name": "production",
                                "backend": "openai_upstream",
                                "backend_config": {
                                    "base_url": upstream + "/v1",
                                    "model": UPSTREAM_MODEL,
                                    "api_key_env": KEY_ENV,
                                },
                                "mitigations": [
                                    {
                                        "name": "filter",
                                        "kind": "input_filter",
                                        "stance": "claimed",
                                        "config": {"patterns": ["zyloxin"]},
                                    }
                                ],
                            },
                        ],
                    }
                ],
            }
        ]
    }
    with running_lab(db, manifest) as lab:
        yield lab


def test_upstream_variant_through_gateway(upstream_lab: Lab, upstream: str) -> None:
    _gid, key = upstream_lab.grant(model="frontier", variants=["helpful-only", "production"])
    client = openai.OpenAI(base_url=upstream_lab.url + "/v1", api_key=key, max_retries=0)
    resp = client.chat.completions.create(
        model="frontier/helpful-only", messages=[{"role": "user", "content": "abc def"}], logprobs=True
    )
    assert resp.model == "frontier/helpful-only"
    assert resp.choices[0].message.content == "fed cba"
    with urllib.request.urlopen(f"{upstream}/_debug/requests", timeout=5) as r:
        seen = json.loads(r.read())[-1]
    headers = {k.lower(): v for k, v in seen["headers"].items()}
    assert headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert key not in json.dumps(seen)  # the evaluator's key never leaves Airlock
    assert seen["body"]["model"] == UPSTREAM_MODEL

    text = "".join(
        chunk.choices[0].delta.content or ""
        for chunk in client.chat.completions.create(
            model="frontier/helpful-only", messages=[{"role": "user", "content": "one two"}], stream=True
        )
        if chunk.choices
    )
    assert text == "owt eno"
    blocked = client.chat.completions.create(
        model="frontier/production", messages=[{"role": "user", "content": "zyloxin recipe"}]
    )
    assert blocked.choices[0].finish_reason == "content_filter"
    rows = [r for r in upstream_lab.audit_rows() if r.path == "/v1/chat/completions"]
    assert [r.outcome for r in rows] == ["allowed", "allowed", "blocked"]
    assert rows[0].tokens_out > 0


def test_upstream_failure_is_not_a_500(upstream_lab: Lab) -> None:
    _gid, key = upstream_lab.grant(model="frontier", variants=["helpful-only"])
    client = openai.OpenAI(base_url=upstream_lab.url + "/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(
            model="frontier/helpful-only", messages=[{"role": "user", "content": "TRIGGER_500"}]
        )
    assert info.value.status_code == 502
    assert UPSTREAM_KEY not in str(info.value.body)


def test_upstream_gets_unmodelled_fields_and_responses_requests(upstream_lab: Lab, upstream: str) -> None:
    _gid, key = upstream_lab.grant(model="frontier", variants=["helpful-only"])
    client = openai.OpenAI(base_url=upstream_lab.url + "/v1", api_key=key, max_retries=0)
    vllm_fields = {"top_k": 5, "min_p": 0.1, "structured_outputs": {"regex": "[a-z]+"}}
    client.chat.completions.create(
        model="frontier/helpful-only", messages=[{"role": "user", "content": "abc"}], extra_body=vllm_fields
    )
    with urllib.request.urlopen(f"{upstream}/_debug/requests", timeout=5) as r:
        body = json.loads(r.read())[-1]["body"]
    assert {k: body[k] for k in vllm_fields} == vllm_fields and body["model"] == UPSTREAM_MODEL
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="frontier/helpful-only",
            messages=[{"role": "user", "content": "abc"}],
            extra_body={"chat_template": "{{ messages[-1].content }}"},
        )
    assert info.value.body["param"] == "chat_template"  # type: ignore[index]
    resp = client.responses.create(model="frontier/helpful-only", input="abc def", extra_body={"top_k": 3})
    assert resp.output_text == "fed cba"
    with urllib.request.urlopen(f"{upstream}/_debug/requests", timeout=5) as r:
        body = json.loads(r.read())[-1]["body"]
    assert body["top_k"] == 3 and body["messages"] == [{"role": "user", "content": "abc def"}]
