"""Convert (once, atomically) and load the weights a local backend serves.

What the weights are (model specs, file locations, content hashes) is the registry's
(:mod:`airlock.registry.weights`); the names are re-exported here for the runtime's callers.

Loading a GGUF with transformers dequantizes every tensor (12-15 s on a small CPU), so a GGUF is
converted once into ``<model cache>/<name>-<short hash>`` and later loads read the safetensors
(about 2 s). The Hugging Face hub is never contacted.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from airlock.atomicfile import build_directory_atomically
from airlock.config import get_settings
from airlock.errors import BackendUnavailableError, ConfigError
from airlock.registry.weights import (
    DEFAULT_MODEL_SPEC,
    EMBEDDED_MODELS,
    TINY_RANDOM_CONFIG,
    TINY_TOKENIZER_FROM,
    ModelSpec,
    as_model_spec,
    embedded_gguf_path,
    file_sha256,
    resolve_model_spec,
    weights_content_hash,
)

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# No hub access, ever: set before transformers / huggingface_hub first read their constants
# (this module is what imports them), and every load below also passes local_files_only=True.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

__all__ = [
    "DEFAULT_MODEL_SPEC",
    "EMBEDDED_MODELS",
    "TINY_RANDOM_CONFIG",
    "LoadedModel",
    "ModelSpec",
    "converted_model_dir",
    "embedded_gguf_path",
    "file_sha256",
    "load_model",
    "load_tokenizer",
    "resolve_model_spec",
    "weights_content_hash",
]

_DTYPES = ("float32", "bfloat16", "float16", "auto")


@dataclass
class LoadedModel:
    """A model ready for inference, with its tokenizer and provenance."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    spec: ModelSpec
    content_hash: str


# ---------------------------------------------------------------- convert-once cache

_CONVERT_LOCK = threading.Lock()
_STALE_TMP_S = 3600.0


def _cache_root() -> Path:
    root = get_settings().model_cache_dir
    root.mkdir(parents=True, exist_ok=True)
    return root


def _build_atomically(final: Path, build: Callable[[Path], None]) -> Path:
    """Build a cache entry once (a concurrent builder that wins the race is reused); sweep stale leftovers."""
    if final.is_dir():
        return final
    # Leftovers of crashed conversions: harmless, but they are large, so sweep old ones.
    for stale in final.parent.glob(f".{final.name}.tmp-*"):
        with contextlib.suppress(OSError):
            if time.time() - stale.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(stale, ignore_errors=True)
    return build_directory_atomically(final, build, replace=False)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' progress bars and info logs while loading (server logs stay readable)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]


def converted_model_dir(spec: str | ModelSpec) -> Path:
    """Return a Hugging Face directory holding ``spec``'s model and tokenizer, converting a GGUF once."""
    resolved = as_model_spec(spec)
    if resolved.kind == "hf-dir":
        assert resolved.path is not None
        return resolved.path
    if resolved.kind == "tiny-random":
        raise ConfigError("tiny-random has no weights on disk; use load_model()")
    assert resolved.path is not None
    gguf = resolved.path
    final = _cache_root() / f"{resolved.name}-{weights_content_hash(resolved)[:12]}"

    def build(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        with _quiet_transformers():
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
            # The weights are dequantized now: drop the GGUF quantizer so the dir saves and reloads as plain fp32.
            model.hf_quantizer = None  # type: ignore[assignment]
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)

    with _CONVERT_LOCK:
        return _build_atomically(final, build)


def _tokenizer_dir(spec: ModelSpec) -> Path:
    """Return a directory with just the tokenizer of ``spec`` (cached separately for tiny-random)."""
    if spec.kind == "hf-dir":
        assert spec.path is not None
        return spec.path
    source = resolve_model_spec(f"embedded:{TINY_TOKENIZER_FROM}") if spec.kind == "tiny-random" else spec
    assert source.path is not None
    # A full conversion already carries the tokenizer; reuse it rather than extracting again.
    full = _cache_root() / f"{source.name}-{weights_content_hash(source)[:12]}"
    if full.is_dir():
        return full
    gguf = source.path
    final = _cache_root() / f"{source.name}-tokenizer-{weights_content_hash(source)[:12]}"

    def build(tmp: Path) -> None:
        from transformers import AutoTokenizer

        with _quiet_transformers():
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
            tok.save_pretrained(tmp)

    with _CONVERT_LOCK:
        return _build_atomically(final, build)


# ---------------------------------------------------------------- loading


def load_tokenizer(spec: str | ModelSpec, *, seed: int | None = None) -> PreTrainedTokenizerBase:
    """Load the tokenizer of ``spec`` (with its chat template), converting/caching it once."""
    from transformers import AutoTokenizer

    resolved = as_model_spec(spec, seed)
    with _quiet_transformers():
        tok = AutoTokenizer.from_pretrained(_tokenizer_dir(resolved), local_files_only=True)
    if tok.pad_token_id is None:
        # Batched prefill left-pads; the pad id is never attended to, any valid id works.
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.convert_ids_to_tokens(0)
    return tok


def _torch_dtype(dtype: str) -> torch.dtype | str:
    import torch

    if dtype not in _DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(_DTYPES)}, not {dtype!r}")
    return "auto" if dtype == "auto" else getattr(torch, dtype)


def _build_tiny_random(spec: ModelSpec, tokenizer: PreTrainedTokenizerBase, dtype: str) -> PreTrainedModel:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TINY_RANDOM_CONFIG,
    )
    # fork_rng: seeding must not disturb the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = LlamaForCausalLM(config)
    torch_dtype = _torch_dtype(dtype)
    if isinstance(torch_dtype, torch.dtype):
        model = model.to(torch_dtype)  # type: ignore[arg-type]
    return model


def load_model(
    spec: str | ModelSpec = DEFAULT_MODEL_SPEC,
    *,
    seed: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
) -> LoadedModel:
    """Load ``spec`` for inference (eval mode, on ``device``), converting a GGUF on first use."""
    from transformers import AutoModelForCausalLM

    resolved = as_model_spec(spec, seed)
    if resolved.kind in ("embedded", "gguf"):
        converted_model_dir(resolved)  # first: the conversion also yields the tokenizer
    tokenizer = load_tokenizer(resolved)
    if resolved.kind == "tiny-random":
        model = _build_tiny_random(resolved, tokenizer, dtype)
    else:
        with _quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(
                converted_model_dir(resolved), local_files_only=True, dtype=_torch_dtype(dtype)
            )
    try:
        model = model.to(device)  # type: ignore[arg-type]
    except (RuntimeError, AssertionError) as exc:  # e.g. CUDA requested on a CPU-only build
        raise BackendUnavailableError(f"cannot place model {resolved.spec!r} on device {device!r}: {exc}") from exc
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, spec=resolved, content_hash=weights_content_hash(resolved))
