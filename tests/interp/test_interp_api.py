"""The interp API end to end: submit, follow, fetch the result, review, cancel, quotas and refusals."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from tests.conftest import HTTP_TIMEOUT, Lab, needs_bwrap, running_lab

MANIFEST: dict[str, Any] = {
    "models": [
        {
            "name": "tiny",
            "versions": [
                {
                    "label": "v1",
                    "weights": "tiny-random",
                    "variants": [{"name": "helpful-only"}, {"name": "remote", "backend": "fake"}],
                }
            ],
        }
    ]
}

PROBE = """
import numpy as np
from airlock.interp import client

def main(prompts, layer=0):
    name = client.layer(layer)
    acts = client.collect(prompts, name)
    lens = client.logit_lens(prompts[0], top_k=3)
    print(f"collected {acts.shape}")
    return {"activations": acts, "mean_norm": float(np.linalg.norm(acts, axis=1).mean()), "lens": lens}
"""

SLEEPER = "import time\ndef main():\n    time.sleep(60)\n"


@pytest.fixture
def interp_lab(db: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Lab]:
    """A live gateway over the tiny-random model; results over 4 KiB wait for review."""
    from airlock.config import reset_settings

    monkeypatch.setenv("AIRLOCK_INTERP_REVIEW_OVER_BYTES", "4096")
    monkeypatch.setenv("AIRLOCK_INTERP_WALL_TIMEOUT_S", "60")
    reset_settings()
    with running_lab(db, MANIFEST) as lab:
        yield lab


def _client(lab: Lab, token: str) -> httpx.Client:
    return httpx.Client(base_url=lab.url, headers={"Authorization": f"Bearer {token}"}, timeout=HTTP_TIMEOUT)


def _wait(http: httpx.Client, job_id: str, *, until: tuple[str, ...], seconds: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + seconds
    while True:
        job = http.get(f"/v1/airlock/interp/jobs/{job_id}").json()
        if job["status"] in until:
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.1)


def _reviewer(lab: Lab) -> str:
    """A lab token with the reviewer role (admin tokens issue access and may not review)."""
    from airlock.access.service import create_admin_token

    with lab.db.session() as session:
        return create_admin_token(session, "rita", "reviewer")[1]


def _grant(lab: Lab, **kwargs: Any) -> str:
    kwargs.setdefault("scopes", ["interp"])
    _gid, key = lab.grant(model="tiny", variants=["helpful-only", "remote"], **kwargs)
    return key


@needs_bwrap
def test_submit_follow_result_and_review(interp_lab: Lab) -> None:
    key = _grant(interp_lab)
    with _client(interp_lab, key) as http:
        small = {"model": "tiny/helpful-only", "code": PROBE, "args": {"prompts": ["hi"]}}
        small["code"] += "\ndef tiny(prompts):\n    return {'n': len(prompts), 'first': main(prompts)['mean_norm']}\n"
        small["entry_point"] = "tiny"
        created = http.post("/v1/airlock/interp/jobs", json=small)
        assert created.status_code == 200, created.text
        job = created.json()
        assert job["id"].startswith("ijob_") and job["status"] in ("queued", "running")
        assert len(job["code_sha256"]) == 64
        done = _wait(http, job["id"], until=("succeeded", "failed"))
        assert done["status"] == "succeeded", done
        assert "collected (1, 64)" in done["logs"]
        assert done["usage"]["rpc"]["calls"]["trace"] == 2 and done["usage"]["cpu_seconds"] > 0
        result = http.get(f"/v1/airlock/interp/jobs/{job['id']}/result").json()
        assert result["value"]["n"] == 1 and result["value"]["first"] > 0 and result["arrays"] == []

        # A bigger result (the activations of 40 prompts) waits for a lab reviewer.
        big = {"model": "tiny/helpful-only", "code": PROBE, "args": {"prompts": [f"p {i}" for i in range(40)]}}
        held_id = http.post("/v1/airlock/interp/jobs", json=big).json()["id"]
        held = _wait(http, held_id, until=("awaiting_review", "failed"))
        assert held["status"] == "awaiting_review", held
        assert "exceeds the review threshold of 4096 bytes" in held["review"]["reasons"][0]
        refused = http.get(f"/v1/airlock/interp/jobs/{held_id}/result")
        assert refused.status_code == 409 and refused.json()["error"]["code"] == "awaiting_review"
        # Evaluators cannot review their own results.
        assert http.post(f"/v1/airlock/interp/review/{held_id}", json={"decision": "approve"}).status_code == 401

    with _client(interp_lab, _reviewer(interp_lab)) as lab_http:
        queue = lab_http.get("/v1/airlock/interp/review").json()["data"]
        assert [item["id"] for item in queue] == [held_id]
        assert "def main(prompts" in queue[0]["code"] and queue[0]["args"]["prompts"][0] == "p 0"
        denied = lab_http.post(f"/v1/airlock/interp/review/{held_id}", json={"decision": "deny"})
        assert denied.status_code == 400 and "needs a reason" in denied.json()["error"]["message"]
        approved = lab_http.post(f"/v1/airlock/interp/review/{held_id}", json={"decision": "approve"})
        assert approved.status_code == 200 and approved.json()["review"]["state"] == "approved"
        again = lab_http.post(f"/v1/airlock/interp/review/{held_id}", json={"decision": "approve"})
        assert again.status_code == 409

    with _client(interp_lab, key) as http:
        result = http.get(f"/v1/airlock/interp/jobs/{held_id}/result").json()
        assert result["value"]["activations"] == {"__array__": "a0"}
        assert result["arrays"] == [{"name": "a0", "dtype": "float32", "shape": [40, 64]}]
        npz = http.get(result["npz_path"])
        assert npz.status_code == 200
        with np.load(io.BytesIO(npz.content)) as arrays:
            assert arrays["a0"].shape == (40, 64) and np.isfinite(arrays["a0"]).all()
        assert len(result["value"]["lens"]) == 3  # two layers and the final read-out
        # Another organisation sees nothing of it.
        other = _grant(interp_lab, evaluator="org-b")
        with _client(interp_lab, other) as stranger:
            assert stranger.get(f"/v1/airlock/interp/jobs/{held_id}").status_code == 404
            assert stranger.get(f"/v1/airlock/interp/jobs/{held_id}/result").status_code == 404

    rows = interp_lab.audit_rows()
    submits = [r for r in rows if r.path == "/v1/airlock/interp/jobs" and r.method == "POST"]
    assert submits and all(len(r.detail["code_sha256"]) == 64 for r in submits)


@needs_bwrap
def test_denial_cancel_and_job_errors(interp_lab: Lab) -> None:
    key = _grant(interp_lab)
    with _client(interp_lab, key) as http:
        big = {"model": "tiny/helpful-only", "code": PROBE, "args": {"prompts": [f"q {i}" for i in range(40)]}}
        held_id = http.post("/v1/airlock/interp/jobs", json=big).json()["id"]
        sleeper_id = http.post("/v1/airlock/interp/jobs", json={"model": "tiny/helpful-only", "code": SLEEPER}).json()[
            "id"
        ]
        _wait(http, held_id, until=("awaiting_review",))
        _wait(http, sleeper_id, until=("running",))
        cancelled = http.post(f"/v1/airlock/interp/jobs/{sleeper_id}/cancel")
        assert cancelled.status_code == 200
        assert _wait(http, sleeper_id, until=("cancelled",), seconds=15)["status"] == "cancelled"
        assert http.post(f"/v1/airlock/interp/jobs/{sleeper_id}/cancel").status_code == 409

        failing = {"model": "tiny/helpful-only", "code": "def main():\n    raise ValueError('no luck')\n"}
        failed = _wait(http, http.post("/v1/airlock/interp/jobs", json=failing).json()["id"], until=("failed",))
        # The grant keeps no content (retention_interp=none): what the code printed and raised goes when it
        # ends; the error code still says how (tests/access/test_retention.py has the canary version).
        assert failed["error"]["code"] == "code_error" and "no luck" not in failed["error"]["message"]
        assert "not kept readable" in failed["error"]["message"] and failed["logs"] == ""

    with _client(interp_lab, _reviewer(interp_lab)) as lab_http:
        denied = lab_http.post(f"/v1/airlock/interp/review/{held_id}", json={"decision": "deny", "reason": "too broad"})
        assert denied.status_code == 200 and denied.json()["status"] == "denied"
    with _client(interp_lab, key) as http:
        refused = http.get(f"/v1/airlock/interp/jobs/{held_id}/result")
        assert refused.status_code == 409 and "too broad" in refused.json()["error"]["message"]
        assert http.get(f"/v1/airlock/interp/jobs/{held_id}").json()["status"] == "denied"

    # Quotas: once a grant's interp CPU seconds are spent, new jobs are refused.
    key = _grant(interp_lab, evaluator="org-q", quota_interp_cpu_seconds=0.001)
    with _client(interp_lab, key) as http:
        body = {"model": "tiny/helpful-only", "code": "def main():\n    return {'ok': True}\n"}
        first = _wait(http, http.post("/v1/airlock/interp/jobs", json=body).json()["id"], until=("succeeded", "failed"))
        assert first["status"] in ("succeeded", "failed")  # its CPU limit was what the quota had left
        second = http.post("/v1/airlock/interp/jobs", json=body)
        assert second.status_code == 429 and second.json()["error"]["code"] == "insufficient_quota"
        assert "CPU seconds is used up" in second.json()["error"]["message"]


def test_refusals_are_clear_4xx(interp_lab: Lab) -> None:
    key = _grant(interp_lab, scopes=["sample"])
    with _client(interp_lab, key) as http:
        body = {"model": "tiny/helpful-only", "code": "def main():\n    return {}\n"}
        denied = http.post("/v1/airlock/interp/jobs", json=body)
        assert denied.status_code == 403 and denied.json()["error"]["code"] == "scope_not_granted"
    key = _grant(interp_lab, evaluator="org-c")
    with _client(interp_lab, key) as http:
        cases = [
            ({"model": "tiny/remote", "code": "def main():\n    return {}\n"}, 400, "backend_not_supported"),
            ({"model": "tiny/nope", "code": "def main():\n    return {}\n"}, 404, None),
            ({"model": "tiny/helpful-only", "code": "def main(:\n"}, 400, "syntax_error"),
            ({"model": "tiny/helpful-only", "code": "x = 1\n", "entry_point": "not valid"}, 400, None),
            ({"model": "tiny/helpful-only", "code": "x = 1\n", "filename": "../etc/passwd"}, 400, None),
            ({"model": "tiny/helpful-only", "code": "x = 1\n", "unknown": 1}, 400, None),
        ]
        for body, status, code in cases:
            response = http.post("/v1/airlock/interp/jobs", json=body)
            assert response.status_code == status, (body, response.text)
            error = response.json()["error"]
            assert error["message"] and (code is None or error["code"] == code), error
        assert http.get("/v1/airlock/interp/jobs/ijob_missing").status_code == 404
        assert http.get("/v1/airlock/interp/jobs").json() == {"object": "list", "data": [], "has_more": False}
    with _client(interp_lab, key) as http:
        assert http.get("/v1/airlock/interp/review").status_code == 401
    from airlock.access.service import create_admin_token

    with interp_lab.db.session() as session:
        _row, decider = create_admin_token(session, "dora", "decider")
    with _client(interp_lab, decider) as http:
        wrong_role = http.get("/v1/airlock/interp/review")
        assert wrong_role.status_code == 403 and wrong_role.json()["error"]["code"] == "role_not_allowed"
    with _client(interp_lab, _reviewer(interp_lab)) as http:
        assert http.get("/v1/airlock/interp/review", params={"state": "bogus"}).status_code == 400
        assert http.post("/v1/airlock/interp/review/ijob_nope", json={"decision": "approve"}).status_code == 404
