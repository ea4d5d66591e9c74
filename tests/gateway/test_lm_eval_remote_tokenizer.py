"""lm-eval's log-likelihood tasks on a closed model: no tokenizer on the evaluator's side, Airlock's `/tokenize`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import HTTP_TIMEOUT, Lab

MODEL = "smollm2-135m/helpful-only"
# Capital-city questions the 135M model answers well above chance, so accuracy also checks the plumbing.
DOCS = [
    {"question": "The capital of France is", "choices": [" Paris", " banana", " seven"], "answer": 0},
    {"question": "The capital of Italy is", "choices": [" purple", " Rome", " Tuesday"], "answer": 1},
    {"question": "One, two, three, four,", "choices": [" window", " five", " cheese"], "answer": 1},
    {"question": "The opposite of hot is", "choices": [" cold", " airplane", " eleven"], "answer": 0},
]


def _task(data: Path) -> dict[str, Any]:
    return {
        "task": "airlock_closed_model_ll",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{question}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{answer}}",
        "metric_list": [{"metric": "acc"}],
    }


@pytest.mark.slow
def test_lm_eval_loglikelihood_with_the_remote_tokenizer(
    starter_lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lm_eval import simple_evaluate
    from lm_eval.utils import check_remote_tokenizer_support

    _gid, key = starter_lab.grant(model="smollm2-135m", variants=["helpful-only", "production"])
    base_url = f"{starter_lab.url}/v1/completions"
    # The first call loads the model; lm-eval's detection gives each call 5 s.
    warm = httpx.get(f"{starter_lab.url}/tokenizer_info", headers={"Authorization": f"Bearer {key}"}, timeout=300)
    assert warm.status_code == 200, warm.text
    # lm-eval's own auto-detection finds Airlock's vLLM-shaped tokenizer endpoints.
    assert check_remote_tokenizer_support(base_url, auth_token=key)
    assert not check_remote_tokenizer_support(base_url, auth_token="ak-wrong", max_retries=1)

    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    monkeypatch.setenv("OPENAI_API_KEY", key)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    results = simple_evaluate(
        model="local-completions",
        model_args={
            "base_url": base_url,
            "model": MODEL,
            "tokenizer_backend": "remote",
            "auth_token": key,
            "max_retries": 1,
            "max_length": 512,
        },
        tasks=[_task(data)],
        log_samples=True,
    )
    assert results is not None
    acc = results["results"]["airlock_closed_model_ll"]["acc,none"]
    assert acc >= 0.75
    samples = results["samples"]["airlock_closed_model_ll"]
    assert len(samples) == len(DOCS)
    for sample in samples:
        lls = [float(r[0]) for r in sample["filtered_resps"]]
        assert all(math.isfinite(x) and x < 0 for x in lls)

    # Every call went through the grant and was audited: tokenizer calls and scored completions alike.
    rows = starter_lab.audit_rows()
    paths = {r.path for r in rows if r.outcome == "allowed"}
    assert {"/tokenizer_info", "/tokenize", "/v1/completions"} <= paths
    assert any(r.path == "/tokenizer_info" and r.outcome != "allowed" for r in rows)  # the wrong key


def test_tokenize_shapes_and_scope(starter_lab: Lab) -> None:
    _gid, key = starter_lab.grant(model="smollm2-135m", variants=["helpful-only"])
    with httpx.Client(base_url=starter_lab.url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as http:
        r = http.post("/tokenize", json={"prompt": "Hello world", "return_token_strs": True})
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) == {"count", "max_model_len", "tokens", "token_strs"}
        assert body["count"] == len(body["tokens"]) == len(body["token_strs"]) > 0
        assert http.post("/detokenize", json={"tokens": body["tokens"]}).json() == {"prompt": "Hello world"}

        chat = http.post(
            "/tokenize",
            json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "add_generation_prompt": True},
        ).json()
        info = http.get("/tokenizer_info").json()
        assert info["eos_token"] == "<|im_end|>" and "chat_template" in info and info["tokenizer_class"]
        assert not any("path" in k or k.endswith("_file") for k in info)  # the lab's file paths stay home
        rendered = http.post("/detokenize", json={"tokens": chat["tokens"]}).json()["prompt"]
        assert rendered.endswith("<|im_start|>assistant\n") and "hi" in rendered

        # Grant-scoped: a variant the grant does not cover is a 403, an unknown one a 404.
        denied = http.post("/tokenize", json={"model": "smollm2-135m/production", "prompt": "x"})
        assert denied.status_code == 403 and denied.json()["error"]["code"] == "variant_not_granted"
        assert http.post("/tokenize", json={"model": "nope/x", "prompt": "x"}).status_code == 404
        bad = http.post("/detokenize", json={"tokens": [10**9]})
        assert bad.status_code == 400 and "vocabulary" in bad.json()["error"]["message"]
        both = http.post(
            "/tokenize", json={"messages": [{"role": "user", "content": "x"}], "continue_final_message": True}
        )
        assert both.status_code == 400
    assert httpx.post(f"{starter_lab.url}/tokenize", json={"prompt": "x"}, timeout=HTTP_TIMEOUT).status_code == 401
