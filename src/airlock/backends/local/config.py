"""Settings of a local backend (`LocalBackendConfig`) and the counters of its batching worker (`BatchStats`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from airlock.backends import weights
from airlock.errors import ConfigError


@dataclass(frozen=True)
class LocalBackendConfig:
    """Settings of a local backend (the ``config`` mapping of a ``backend: local`` variant)."""

    model: str = weights.DEFAULT_MODEL_SPEC
    max_batch_size: int = 16
    batch_wait_ms: float = 5.0
    default_max_tokens: int = 256
    max_context: int = 2048
    device: str = "cpu"
    seed: int | None = None
    dtype: str = "float32"
    continuous_batching: bool = True
    # Set by noise-injection jobs on a copy of a variant's config (the private weights are noised
    # on load, never stored): N(0, noise_sigma^2) on every weight, drawn from noise_seed.
    noise_sigma: float | None = None
    noise_seed: int = 0
    noise_job: str | None = None
    """The noise-injection job of a noised copy: each job's ``(sigma, seed)`` is its own copy."""
    noise_expires_at: str | None = None
    """When a noised copy stops being served (ISO 8601): a Ray model worker holding it exits on its own after it."""
    num_gpus: int | None = None
    """GPUs a Ray model worker of these weights asks for (default: 1 on ``cuda``, else 0); unused in-process."""
    threads: int | None = None
    """Intra-op threads of the engine's worker, fixed. None: sized before each new batch from the host's
    load average, up to torch's default of one per core (`engine.auto_threads`). On a host shared
    with other busy processes fewer threads step faster: an OpenMP team waits at every barrier for
    its slowest thread, and a descheduled one stalls the whole step."""

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> LocalBackendConfig:
        """Validate ``config``; unknown keys and wrong types are configuration errors."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ConfigError(f"local backend: unknown config key(s) {unknown} (known: {sorted(known)})")
        values = dict(config)

        def check_int(key: str, low: int) -> None:
            value = values.get(key)
            if value is None:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"local backend: {key} must be an integer >= {low}, not {value!r}")

        for key, low in (
            ("max_batch_size", 1),
            ("default_max_tokens", 1),
            ("max_context", 2),
            ("seed", 0),
            ("noise_seed", 0),
            ("num_gpus", 0),
            ("threads", 1),
        ):
            check_int(key, low)
        wait = values.get("batch_wait_ms", 5.0)
        if isinstance(wait, bool) or not isinstance(wait, int | float) or wait < 0:
            raise ConfigError(f"local backend: batch_wait_ms must be a number >= 0, not {wait!r}")
        for key in ("model", "device", "dtype", "noise_job", "noise_expires_at"):
            optional = key.startswith("noise_") and values.get(key) is None
            if key in values and not optional and not isinstance(values[key], str):
                raise ConfigError(f"local backend: {key} must be a string, not {values[key]!r}")
        sigma = values.get("noise_sigma")
        if sigma is not None and (isinstance(sigma, bool) or not isinstance(sigma, int | float) or not 0 <= sigma <= 1):
            raise ConfigError(f"local backend: noise_sigma must be a number in [0, 1], not {sigma!r}")
        if "continuous_batching" in values and not isinstance(values["continuous_batching"], bool):
            raise ConfigError("local backend: continuous_batching must be true or false")
        return cls(**values)


@dataclass
class BatchStats:
    """Counters of the batching worker (read them for tests, benchmarks and metrics)."""

    requests: int = 0
    rows: int = 0
    prefills: int = 0
    prefill_tokens: int = 0
    shared_prefix_tokens: int = 0
    """Prompt tokens not computed again because the rows of a prefill shared them."""
    decode_steps: int = 0
    tokens_generated: int = 0
    max_batch_rows_seen: int = 0
    merges: int = 0
    cancelled_rows: int = 0
    failed_requests: int = 0

    def as_dict(self) -> dict[str, int]:
        """Return the counters as a plain dict."""
        return asdict(self)
