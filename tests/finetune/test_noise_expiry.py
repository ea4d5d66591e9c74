"""Noise-injected variants' copies of the weights are closed at expiry, with no further request to notice it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from airlock.backends.base import ModelBackend
from airlock.backends.pool import BackendPool, VariantRuntimeSpec
from airlock.ids import NoisedRef, parse_model_id
from airlock.serving.pipelines import NoisedExpiry, PipelineCache
from tests.conftest import HTTP_TIMEOUT, Lab, single_variant_manifest, sqlite_lab
from tests.finetune.waits import wait_on_progress

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


class Copy(ModelBackend):
    """A backend standing in for a noised copy of the weights: says when it is retired or closed."""

    kind = "local"

    def __init__(self, config: dict[str, Any], retired: asyncio.Queue[dict[str, Any]]) -> None:
        self.config = config
        self.retired = retired
        self.closed = False

    async def retire(self) -> None:
        self.closed = True
        await self.retired.put(self.config)


def _spec() -> VariantRuntimeSpec:
    return VariantRuntimeSpec("var-1", "local", {"model": "tiny-random"}, [])


def _noise(job: str, sigma: float = 0.1, seed: int = 0) -> NoisedRef:
    return NoisedRef(base=parse_model_id("tiny@v1/helpful-only"), job_id=job, sigma=sigma, seed=seed)


@dataclass
class Sweeping:
    """A pipeline cache over stand-in copies, its expiry sweeper, the clock they read and what was retired."""

    cache: PipelineCache
    expiry: NoisedExpiry
    clock: Clock
    retired: asyncio.Queue[dict[str, Any]]


@pytest.fixture
def sweeping() -> Sweeping:
    retired: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    clock = Clock(T0)
    cache = PipelineCache(BackendPool(lambda spec: Copy(spec.backend_config, retired)), clock=clock)
    return Sweeping(cache, NoisedExpiry(cache), clock, retired)


async def test_a_noised_copy_is_retired_at_expiry_without_another_request(
    sweeping: Sweeping,
) -> None:
    cache, expiry, clock, retired = sweeping.cache, sweeping.expiry, sweeping.clock, sweeping.retired
    expiry.start()
    try:
        await cache.noise_pipeline(_spec(), _noise("noise-a"), T0 + timedelta(seconds=30))
        await cache.noise_pipeline(_spec(), _noise("noise-b"), T0 + timedelta(seconds=90))
        # Two jobs with the same (sigma, seed) are two copies, each with its own expiry.
        assert cache.noised_loaded == 2 and retired.empty()
        assert expiry.wait_s() == 30.0  # the sweeper sleeps until the first expiry, no busy poll
        clock.now = T0 + timedelta(seconds=31)
        expiry.poke()
        first = await asyncio.wait_for(retired.get(), 30)
        assert first["noise_job"] == "noise-a" and first["noise_expires_at"] == (T0 + timedelta(seconds=30)).isoformat()
        assert cache.noised_loaded == 1 and retired.empty()
        assert expiry.wait_s() == 59.0
        clock.now = T0 + timedelta(seconds=90)
        expiry.poke()
        second = await asyncio.wait_for(retired.get(), 30)
        assert second["noise_job"] == "noise-b" and cache.noised_loaded == 0
        assert expiry.wait_s() is None  # nothing loaded: it sleeps until something is
    finally:
        await expiry.stop()
    assert expiry._task is None


async def test_the_sweeper_wakes_for_a_copy_loaded_while_it_sleeps(
    sweeping: Sweeping,
) -> None:
    cache, expiry, retired = sweeping.cache, sweeping.expiry, sweeping.retired
    expiry.start()
    try:
        await asyncio.sleep(0)  # the sweeper is asleep with nothing loaded
        # Loaded already past its expiry (its id was resolved just before it): closed at once, unprompted.
        await cache.noise_pipeline(_spec(), _noise("noise-c"), T0 - timedelta(seconds=1))
        gone = await asyncio.wait_for(retired.get(), 30)
        assert gone["noise_job"] == "noise-c" and cache.noised_loaded == 0
    finally:
        await expiry.stop()


async def test_the_wait_is_bounded_when_the_next_expiry_is_far(
    sweeping: Sweeping,
) -> None:
    cache, expiry = sweeping.cache, sweeping.expiry
    await cache.noise_pipeline(_spec(), _noise("noise-d"), T0 + timedelta(days=7))
    assert expiry.wait_s() == expiry.max_wait_s  # a wall-clock jump is noticed within a minute


async def test_least_recently_used_copies_beyond_the_limit_are_retired(
    sweeping: Sweeping,
) -> None:
    cache, retired = sweeping.cache, sweeping.retired
    cache.max_noised = 2
    for seed in range(3):
        await cache.noise_pipeline(_spec(), _noise("noise-e", seed=seed), T0 + timedelta(hours=1))
    assert cache.noised_loaded == 2
    assert (await asyncio.wait_for(retired.get(), 30))["noise_seed"] == 0


# ---------------------------------------------------------------------------------- a live gateway


@pytest.fixture
def noise_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with sqlite_lab(tmp_path_factory.mktemp("noise-expiry"), single_variant_manifest("tiny", "tiny-random")) as lab:
        yield lab


def _noised_backends(lab: Lab) -> list[Any]:
    pool = lab.server.app.state.gateway.pool
    return [b for b in list(pool._backends.values()) if getattr(b, "config", None) and b.config.noise_sigma]


def test_a_live_gateway_closes_an_expired_copy_with_no_request_and_keeps_the_base(noise_lab: Lab) -> None:
    _g, key = noise_lab.grant("org-a", model="tiny", variants=["helpful-only"], scopes=["sample", "finetune"])
    headers = {"Authorization": f"Bearer {key}"}
    ask = {"model": "tiny@v1/helpful-only", "sigmas": [0.01], "seeds": [1], "ttl_minutes": 30}
    created = httpx.post(f"{noise_lab.url}/v1/airlock/noise/jobs", json=ask, headers=headers, timeout=HTTP_TIMEOUT)
    assert created.status_code == 201, created.text
    job = created.json()
    done = wait_on_progress(noise_lab.db, job["id"], lambda j: j.status in ("succeeded", "failed"))
    assert done.status == "succeeded", done.error

    def sample(model: str) -> httpx.Response:
        body = {"model": model, "prompt": "one two", "max_tokens": 2, "temperature": 0}
        return httpx.post(f"{noise_lab.url}/v1/completions", json=body, headers=headers, timeout=HTTP_TIMEOUT)

    assert sample("tiny/helpful-only").status_code == 200
    assert sample(job["variants"][0]["id"]).status_code == 200
    [copy] = _noised_backends(noise_lab)
    assert copy._engine is not None  # its own weights, loaded
    gateway = noise_lab.server.app.state
    # Move the gateway's clock past the expiry and wake the sweeper: nothing else is sent.
    expires_at = datetime.fromisoformat(job["expires_at"])
    gateway.gateway.pipelines.clock = lambda: expires_at + timedelta(seconds=1)
    gateway.noised_expiry.poke()
    while _noised_backends(noise_lab) or copy._engine is not None:
        time.sleep(0.02)  # the test's timeout bounds a sweeper that never comes
    assert gateway.gateway.pipelines.noised_loaded == 0
    assert sample("tiny/helpful-only").status_code == 200  # the base variant's backend is untouched


async def test_concurrent_sweeps_count_only_the_copies_each_closed(sweeping: Sweeping) -> None:
    cache, clock = sweeping.cache, sweeping.clock
    gate = asyncio.Event()
    for job in ("noise-e", "noise-f"):
        await cache.noise_pipeline(_spec(), _noise(job), T0 + timedelta(seconds=5))
    for backend in cache.pool._backends.values():
        assert isinstance(backend, Copy)
        backend.retire = gate.wait  # type: ignore[method-assign]  # each close waits for the gate
    clock.now = T0 + timedelta(seconds=6)
    first = asyncio.create_task(cache.retire_expired())  # takes one copy, then waits on its close
    await asyncio.sleep(0)
    second = asyncio.create_task(cache.retire_expired())  # takes the other one meanwhile
    await asyncio.sleep(0)
    gate.set()
    assert sorted(await asyncio.gather(first, second)) == [1, 1]
    assert cache.noised_loaded == 0
