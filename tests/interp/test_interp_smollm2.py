"""One interp job on the real SmolLM2 (slow): the logit-lens example through the lab's API."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from tests.conftest import HTTP_TIMEOUT, REPO, Lab, needs_bwrap

pytestmark = [pytest.mark.slow, needs_bwrap]


def test_logit_lens_example_finds_paris(starter_lab: Lab) -> None:
    _gid, key = starter_lab.grant(
        "interp-org", model="smollm2-135m", variants=["helpful-only"], scopes=["interp"], quota_interp_cpu_seconds=600
    )
    code = (REPO / "examples" / "interp" / "logit_lens.py").read_text()
    with httpx.Client(
        base_url=starter_lab.url, headers={"Authorization": f"Bearer {key}"}, timeout=HTTP_TIMEOUT
    ) as http:
        body = {"model": "smollm2-135m/helpful-only", "code": code, "args": {"prompt": "The capital of France is"}}
        job_id = http.post("/v1/airlock/interp/jobs", json=body).json()["id"]
        deadline = time.monotonic() + 300
        job: dict[str, Any] = {}
        while time.monotonic() < deadline:
            job = http.get(f"/v1/airlock/interp/jobs/{job_id}").json()
            if job["status"] not in ("queued", "running"):
                break
            time.sleep(0.5)
        assert job["status"] == "succeeded", job
        value = http.get(f"/v1/airlock/interp/jobs/{job_id}/result").json()["value"]
    assert value["final_answer"] == " Paris" and -5.0 < value["final_answer_logprob"] < 0.0
    assert len(value["layers"]) == 30
    # Early layers do not yet predict the answer; the residual stream gets there near the top.
    assert value["first_layer_predicting_answer"] is not None and value["first_layer_predicting_answer"] >= 20
