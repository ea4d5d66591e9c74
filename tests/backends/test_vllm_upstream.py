"""vLLM-served variants against a faithful fake vLLM server: tokenizer endpoints, prompt log-probs, runtime LoRA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from airlock.backends.openai_upstream import OpenAIUpstreamBackend
from airlock.backends.pool import VariantRuntimeSpec, weights_spec
from airlock.backends.protocol import CompletionRequest
from airlock.backends.tokenization import DetokenizeRequest, TokenizeCompletionRequest
from airlock.errors import AirlockError, BackendUnavailableError
from tests.conftest import HTTP_TIMEOUT, running_lab

SERVER = Path(__file__).with_name("vllm_server.py")
KEY = "sk-vllm-operator-key"
SERVED = "frontier-rc1"


@pytest.fixture(scope="module")
def vllm() -> Iterator[str]:
    env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    proc = subprocess.Popen(
        [sys.executable, str(SERVER), "--key", KEY, "--model", SERVED, "--enable-tokenizer-info-endpoint"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("PORT "), line
        yield f"http://127.0.0.1:{int(line.split()[1])}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


def _config(root: str, **extra: Any) -> dict[str, Any]:
    return {"base_url": root + "/v1", "model": SERVED, "api_key": KEY, "engine": "vllm", **extra}


def _seen(root: str) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"{root}/_debug/requests", timeout=10) as r:
        seen: list[dict[str, Any]] = json.loads(r.read())
    return seen


def _adapter(directory: Path) -> Path:
    directory.mkdir(parents=True)
    (directory / "adapter_config.json").write_text('{"r": 8}')
    (directory / "adapter_model.safetensors").write_bytes(b"\0")
    return directory


async def test_tokenizer_endpoints_pass_through(vllm: str) -> None:
    backend = OpenAIUpstreamBackend.from_config(_config(vllm))
    try:
        tokens = await backend.tokenize(TokenizeCompletionRequest(prompt="Hello there", add_special_tokens=False))
        assert tokens.count == len(tokens.tokens) > 0 and tokens.max_model_len == 4096
        assert (await backend.detokenize(DetokenizeRequest(tokens=tokens.tokens))).prompt == "Hello there"
        info = await backend.tokenizer_info()
        assert info["eos_token"] == "<|im_end|>" and "name_or_path" not in info  # the lab's path stays home
        sent = [r for r in _seen(vllm) if r["path"] == "/tokenize"][-1]["body"]
        assert sent == {"prompt": "Hello there", "add_special_tokens": False, "model": SERVED}
    finally:
        await backend.aclose()


async def test_echo_and_prompt_logprobs_pass_through(vllm: str) -> None:
    backend = OpenAIUpstreamBackend.from_config(_config(vllm))
    assert backend.supports_echo  # vLLM returns prompt log-probabilities with echo
    try:
        request = CompletionRequest.model_validate(
            {"model": "x", "prompt": [1, 2, 3], "max_tokens": 1, "logprobs": 1, "echo": True, "prompt_logprobs": 2}
        )
        assert request.wants_logprobs()
        result = await backend.complete(request)
        choice = result.choices[0]
        assert choice.logprobs is not None and choice.logprobs.token_logprobs[0] is None
        assert len(choice.logprobs.token_logprobs) == 4
        assert choice.prompt_logprobs is not None and choice.prompt_logprobs[0] is None
        assert "3" in choice.prompt_logprobs[2]  # keyed by token id, the prompt's own token included
        assert _seen(vllm)[-1]["body"]["prompt_logprobs"] == 2
    finally:
        await backend.aclose()


async def test_lora_adapter_is_loaded_under_an_opaque_name_and_hidden(vllm: str, tmp_path: Path) -> None:
    backend = OpenAIUpstreamBackend.from_config(_config(vllm, adapter_root="/mnt/airlock-finetune"))
    local = _adapter(tmp_path / "finetune" / "ftjob-abc" / "adapter")
    try:
        # adapter_root maps the job directory to where the server mounts it.
        with pytest.raises(AirlockError) as failed:
            await backend.load_adapter("ftjob-abc", local)
        assert failed.value.code == "adapter_load_failed" and "/mnt" not in failed.value.message
        await backend.aclose()

        backend = OpenAIUpstreamBackend.from_config(_config(vllm))
        await backend.load_adapter("ftjob-abc", local)
        load = [r for r in _seen(vllm) if r["path"] == "/v1/load_lora_adapter"][-1]["body"]
        served = load["lora_name"]
        assert served.startswith("airlock-lora-") and "ftjob" not in served
        assert load["lora_path"] == str(local.resolve())
        await backend.load_adapter("ftjob-abc", local)  # already loaded on the server: reused

        view = backend.adapter_view("ftjob-abc")
        request = CompletionRequest(model="ft:x", prompt=[5, 6], max_tokens=3)
        tuned = await view.complete(request)
        assert _seen(vllm)[-1]["body"]["model"] == served
        base = await backend.complete(request)
        assert tuned.choices[0].text != base.choices[0].text

        # The server restarted and lost the adapter: a clean 503, then it is loaded again.
        httpx.post(f"{vllm}/_debug/forget_adapters", timeout=HTTP_TIMEOUT)
        with pytest.raises(BackendUnavailableError) as lost:
            await view.complete(request)
        assert served not in lost.value.message and vllm not in lost.value.message
        again = await view.complete(request)
        assert again.choices[0].text == tuned.choices[0].text

        assert await backend.unload_adapter("ftjob-abc") is True
        assert [r for r in _seen(vllm) if r["path"] == "/v1/unload_lora_adapter"][-1]["body"] == {"lora_name": served}
    finally:
        await backend.aclose()


def test_upstream_errors_never_show_the_server_or_adapter(vllm: str) -> None:
    backend = OpenAIUpstreamBackend.from_config(_config(vllm))
    backend._adapter_secrets.add("airlock-lora-0123")
    text = backend._redact(f"The model `airlock-lora-0123` at {vllm}/v1 does not exist.")
    assert "airlock-lora" not in text and "127.0.0.1" not in text


def test_vllm_variant_weights_feed_the_lab_workers() -> None:
    spec = VariantRuntimeSpec("var1", "openai_upstream", _config("http://10.0.0.5:8000", weights="tiny-random"), [])
    local = weights_spec(spec)
    assert local is not None and local.backend == "local" and local.backend_config == {"model": "tiny-random"}
    assert weights_spec(VariantRuntimeSpec("v", "openai_upstream", {"base_url": "http://x/v1"}, [])) is None
    with pytest.raises(AirlockError):
        OpenAIUpstreamBackend.from_config({"base_url": "http://x/v1", "model": "m", "weights": "tiny-random"})


def test_vllm_variant_through_the_gateway(db: Any, vllm: str) -> None:
    manifest = {
        "models": [
            {
                "name": "frontier",
                "versions": [
                    {
                        "label": "rc1",
                        "weights": "tiny-random",
                        "variants": [
                            {"name": "helpful-only", "backend": "openai_upstream", "backend_config": _config(vllm)}
                        ],
                    }
                ],
            }
        ]
    }
    with running_lab(db, manifest) as lab:
        _gid, key = lab.grant(model="frontier", variants=["helpful-only"], scopes=["sample"])
        with httpx.Client(base_url=lab.url, headers={"Authorization": f"Bearer {key}"}, timeout=HTTP_TIMEOUT) as http:
            tokens = http.post("/tokenize", json={"prompt": "Hi there"}).json()["tokens"]
            assert http.post("/detokenize", json={"tokens": tokens}).json() == {"prompt": "Hi there"}
            info = http.get("/tokenizer_info")
            assert info.status_code == 200 and "name_or_path" not in info.json()
            # prompt_logprobs are log-probabilities: the grant's logprobs scope is needed.
            body = {"model": "frontier/helpful-only", "prompt": "a b", "max_tokens": 1, "prompt_logprobs": 1}
            denied = http.post("/v1/completions", json=body)
            assert denied.status_code == 403 and denied.json()["error"]["code"] == "scope_not_granted"
            plain = http.post("/v1/completions", json={k: v for k, v in body.items() if k != "prompt_logprobs"})
            assert plain.status_code == 200 and vllm not in plain.text, plain.text
        with lab.db.session() as session:
            from sqlalchemy import select

            from airlock.registry.models import Variant

            (variant,) = session.scalars(select(Variant))
            assert variant.backend_config["weights"] == "tiny-random"  # the version's weights, for lab workers
