"""Noise-injection jobs: noised variants of a granted local variant, only for its grant, until they expire."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
import torch
from typer.testing import CliRunner

from airlock.backends.noise import NoiseSpec, add_weight_noise
from airlock.cli import app
from airlock.ids import parse_noised_id
from tests.conftest import HTTP_TIMEOUT, Lab, single_variant_manifest, sqlite_lab
from tests.finetune.waits import wait_on_progress


@pytest.fixture
def noise_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with sqlite_lab(tmp_path_factory.mktemp("noise"), single_variant_manifest("tiny", "tiny-random")) as lab:
        yield lab


def _h(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _greedy(lab: Lab, key: str, model: str) -> httpx.Response:
    body = {"model": model, "prompt": "one two three", "max_tokens": 8, "temperature": 0, "logprobs": 1}
    return httpx.post(f"{lab.url}/v1/completions", json=body, headers=_h(key), timeout=HTTP_TIMEOUT)


def test_noise_is_a_pure_function_of_sigma_and_seed() -> None:
    torch.manual_seed(0)
    base = torch.nn.Linear(8, 4)
    a, b, c = (torch.nn.Linear(8, 4) for _ in range(3))
    for m in (a, b, c):
        m.load_state_dict(base.state_dict())
    add_weight_noise(a, NoiseSpec(0.1, 7))
    add_weight_noise(b, NoiseSpec(0.1, 7))
    add_weight_noise(c, NoiseSpec(0.1, 8))
    assert torch.equal(a.weight, b.weight) and not torch.equal(a.weight, c.weight)
    delta = torch.cat([(a.weight - base.weight).flatten(), (a.bias - base.bias).flatten()]).detach()
    assert 0.05 < float(delta.std()) < 0.15  # N(0, 0.1^2) over 36 draws
    with pytest.raises(ValueError):
        NoiseSpec(float("nan"), 0)


def test_noised_variants_are_the_grants_own_and_expire(noise_lab: Lab) -> None:
    _ga, key_a = noise_lab.grant(
        "org-a", model="tiny", variants=["helpful-only"], scopes=["sample", "logprobs", "finetune"]
    )
    _gb, key_b = noise_lab.grant(
        "org-b", model="tiny", variants=["helpful-only"], scopes=["sample", "logprobs", "finetune"]
    )
    _gc, key_c = noise_lab.grant("org-c", model="tiny", variants=["helpful-only"], scopes=["sample", "logprobs"])
    ask = {"model": "tiny@v1/helpful-only", "sigmas": [0.5, 0.0001], "seeds": [1, 2], "ttl_minutes": 30}
    created = httpx.post(f"{noise_lab.url}/v1/airlock/noise/jobs", json=ask, headers=_h(key_a), timeout=HTTP_TIMEOUT)
    assert created.status_code == 201, created.text
    job = created.json()
    ids = [v["id"] for v in job["variants"]]
    assert len(ids) == 4 and all(i.startswith(f"noise:tiny@v1/helpful-only:{job['id']}:") for i in ids)
    done = wait_on_progress(noise_lab.db, job["id"], lambda j: j.status in ("succeeded", "failed"))
    assert done.status == "succeeded", done.error
    described = httpx.get(
        f"{noise_lab.url}/v1/airlock/noise/jobs/{job['id']}", headers=_h(key_a), timeout=HTTP_TIMEOUT
    ).json()
    assert described["parameters"] > 0 and all(v["relative_noise"] > 0 for v in described["variants"])

    base = _greedy(noise_lab, key_a, "tiny/helpful-only").json()
    strong = next(i for i in ids if parse_noised_id(i).sigma == 0.5)
    noised = _greedy(noise_lab, key_a, strong)
    assert noised.status_code == 200, noised.text
    # Greedy decoding on weights with N(0, 0.25) added: the log-probabilities differ from the base's.
    assert noised.json()["choices"][0]["logprobs"]["token_logprobs"] != base["choices"][0]["logprobs"]["token_logprobs"]
    again = _greedy(noise_lab, key_a, strong).json()
    assert again["choices"][0]["text"] == noised.json()["choices"][0]["text"]  # the same noise on every load
    info = httpx.get(f"{noise_lab.url}/v1/airlock/models/{strong}", headers=_h(key_a), timeout=HTTP_TIMEOUT).json()
    assert info["noise"]["sigma"] == 0.5 and info["noise"]["job"] == job["id"] and info["variant"] == "helpful-only"

    # Another grant cannot see, sample or describe it; without the finetune scope none can be asked for.
    assert _greedy(noise_lab, key_b, strong).status_code == 404
    assert (
        httpx.get(
            f"{noise_lab.url}/v1/airlock/noise/jobs/{job['id']}", headers=_h(key_b), timeout=HTTP_TIMEOUT
        ).status_code
        == 404
    )
    assert httpx.get(f"{noise_lab.url}/v1/airlock/noise/jobs", headers=_h(key_b), timeout=HTTP_TIMEOUT).json() == []
    refused = httpx.post(f"{noise_lab.url}/v1/airlock/noise/jobs", json=ask, headers=_h(key_c), timeout=HTTP_TIMEOUT)
    assert refused.status_code == 403, refused.text
    # An id the job did not list (another sigma) is no variant at all.
    forged = strong.rsplit(":", 2)[0] + ":0.3:1"
    assert _greedy(noise_lab, key_a, forged).status_code == 404

    # The Inspect provider takes a noise: id, and its provenance records the noise.
    from inspect_ai.model import get_model

    provider = get_model(f"airlock/{strong}", base_url=noise_lab.url + "/v1", api_key=key_a, memoize=False)
    assert provider.api.provenance["variant"]["noise"]["seed"] == parse_noised_id(strong).seed  # type: ignore[attr-defined]

    # The evaluator's command asks for the same thing.
    runner = CliRunner()
    env = {"AIRLOCK_BASE_URL": noise_lab.url + "/v1", "AIRLOCK_API_KEY": key_a}
    args = ["eval", "noise", "tiny@v1/helpful-only", "--sigma", "0.01", "--seed", "3", "--json"]
    result = runner.invoke(app, args, env=env)
    assert result.exit_code == 0, result.output
    assert [v["sigma"] for v in json.loads(result.output)["variants"]] == [0.01]

    # Once expired, the variant no longer resolves.
    _expire(noise_lab, job["id"])
    gone = _greedy(noise_lab, key_a, strong)
    assert gone.status_code == 404 and "expired" in gone.json()["error"]["message"]


def _expire(lab: Lab, job_id: str) -> None:
    from airlock.db import utcnow
    from airlock.jobs.models import Job

    with lab.db.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.params = {**job.params, "expires_at": (utcnow() - timedelta(seconds=1)).isoformat()}


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"model": "tiny@v1/helpful-only", "sigmas": [0.0], "seeds": [1]}, 400),
        ({"model": "tiny@v1/helpful-only", "sigmas": [2.0], "seeds": [1]}, 400),
        ({"model": "tiny@v1/helpful-only", "sigmas": [0.1, 0.1], "seeds": [1]}, 400),
        ({"model": "tiny@v1/helpful-only", "sigmas": [0.1], "seeds": [-1]}, 400),
        ({"model": "tiny@v1/nope", "sigmas": [0.1], "seeds": [1]}, 404),
        ({"model": "bad id", "sigmas": [0.1], "seeds": [1]}, 400),
    ],
)
def test_bad_requests_are_refused_without_a_job(noise_lab: Lab, body: dict[str, Any], status: int) -> None:
    _ga, key = noise_lab.grant(
        "org-a", model="tiny", variants=["helpful-only"], scopes=["sample", "logprobs", "finetune"]
    )
    r = httpx.post(f"{noise_lab.url}/v1/airlock/noise/jobs", json=body, headers=_h(key), timeout=HTTP_TIMEOUT)
    assert r.status_code == status and r.json()["error"]["message"], r.text
    assert httpx.get(f"{noise_lab.url}/v1/airlock/noise/jobs", headers=_h(key), timeout=HTTP_TIMEOUT).json() == []


def test_a_manifest_cannot_serve_noised_weights_under_a_versions_hash() -> None:
    from airlock.errors import AirlockError
    from airlock.registry.service import parse_manifest

    manifest = single_variant_manifest("tiny", "tiny-random")
    manifest["models"][0]["versions"][0]["variants"][0]["backend_config"] = {"noise_sigma": 0.1}
    with pytest.raises(AirlockError, match="set only by noise-injection jobs"):
        parse_manifest(manifest)
