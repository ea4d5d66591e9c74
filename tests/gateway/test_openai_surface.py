"""OpenAI surface details beyond chat and completions, through the stock openai SDK: model retrieval."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.conftest import Lab


def client(lab: Lab, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=lab.url + "/v1", api_key=key, max_retries=0)


def test_retrieve_model_is_grant_scoped(lab: Lab) -> None:
    _gid, key = lab.grant(variants=["helpful-only"])
    c = client(lab, key)
    for model_id in ("m1/helpful-only", "m1@v1/helpful-only"):
        card = c.models.retrieve(model_id)
        assert (card.id, card.object) == (model_id, "model")
    # Unknown, ungranted variant, another model, malformed: one indistinguishable 404.
    for model_id in ("m1/production", "m1/nope", "m2/production", "nope", "ft:m1/helpful-only:o::ftjob_x"):
        with pytest.raises(openai.NotFoundError) as info:
            c.models.retrieve(model_id)
        body = info.value.body
        assert isinstance(body, dict) and body["code"] == "model_not_found", body
    raw = httpx.get(f"{lab.url}/v1/models/m1/production", headers={"Authorization": f"Bearer {key}"})
    assert raw.status_code == 404 and raw.json()["error"]["param"] == "model"
    assert httpx.get(f"{lab.url}/v1/models/m1/helpful-only").status_code == 401
    rows = [r for r in lab.audit_rows() if r.path.startswith("/v1/models/")]
    assert sorted({r.status_code for r in rows}) == [200, 401, 404]
    assert all(r.actor == "org-a" for r in rows if r.status_code != 401)


def test_unknown_request_fields_are_refused_not_ignored(lab: Lab) -> None:
    _gid, key = lab.grant()
    c = client(lab, key)
    with pytest.raises(openai.BadRequestError) as info:
        c.chat.completions.create(
            model="m1/helpful-only", messages=[{"role": "user", "content": "x"}], extra_body={"top_k": 5}
        )
    body = info.value.body
    assert isinstance(body, dict) and (body["code"], body["param"]) == ("unsupported_parameter", "top_k")
    row = [r for r in lab.audit_rows() if r.path == "/v1/chat/completions"][-1]
    assert row.status_code == 400
