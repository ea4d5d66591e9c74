"""Local backend settings: every key's type and range is checked; the worker's counters read as a dict."""

from __future__ import annotations

from typing import Any

import pytest

from airlock.backends import weights
from airlock.backends.local import BatchStats, LocalBackendConfig
from airlock.errors import ConfigError


def test_defaults() -> None:
    config = LocalBackendConfig.from_dict({})
    assert config == LocalBackendConfig()
    assert config.model == weights.DEFAULT_MODEL_SPEC == "embedded:smollm2-135m"
    assert (config.max_batch_size, config.batch_wait_ms, config.continuous_batching) == (16, 5.0, True)


def test_every_key_is_read() -> None:
    values: dict[str, Any] = {
        "model": "tiny-random",
        "max_batch_size": 4,
        "batch_wait_ms": 0,
        "default_max_tokens": 1,
        "max_context": 2,
        "device": "cpu",
        "seed": 0,
        "dtype": "bfloat16",
        "continuous_batching": False,
        "num_gpus": 4,
        "threads": 1,
    }
    config = LocalBackendConfig.from_dict(values)
    assert {key: getattr(config, key) for key in values} == values


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"batchsize": 4}, r"unknown config key\(s\) \['batchsize'\]"),
        ({"max_batch_size": 0}, "max_batch_size must be an integer >= 1"),
        ({"max_batch_size": True}, "max_batch_size must be an integer"),  # a bool is not a count
        ({"max_batch_size": 2.0}, "max_batch_size must be an integer"),
        ({"default_max_tokens": 0}, "default_max_tokens must be an integer >= 1"),
        ({"max_context": 1}, "max_context must be an integer >= 2"),
        ({"seed": -1}, "seed must be an integer >= 0"),
        ({"batch_wait_ms": "soon"}, "batch_wait_ms must be a number >= 0"),
        ({"batch_wait_ms": -0.5}, "batch_wait_ms must be a number >= 0"),
        ({"batch_wait_ms": False}, "batch_wait_ms must be a number"),
        ({"model": 7}, "model must be a string"),
        ({"device": None}, "device must be a string"),
        ({"dtype": ["float32"]}, "dtype must be a string"),
        ({"continuous_batching": "yes"}, "continuous_batching must be true or false"),
        ({"threads": 0}, "threads must be an integer >= 1"),
    ],
)
def test_bad_values_are_config_errors(config: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        LocalBackendConfig.from_dict(config)


def test_seed_may_be_null() -> None:
    assert LocalBackendConfig.from_dict({"seed": None}).seed is None


def test_batch_stats_as_dict() -> None:
    stats = BatchStats(requests=2, decode_steps=5)
    stats.rows += 3
    counters = stats.as_dict()
    assert counters["requests"] == 2 and counters["rows"] == 3 and counters["decode_steps"] == 5
    assert set(counters) == {
        "requests",
        "rows",
        "prefills",
        "prefill_tokens",
        "shared_prefix_tokens",
        "decode_steps",
        "tokens_generated",
        "max_batch_rows_seen",
        "merges",
        "cancelled_rows",
        "failed_requests",
    }
    assert all(isinstance(v, int) for v in counters.values())
