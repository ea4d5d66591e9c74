"""Placement on the Ray cluster (weights resources, GPUs, worker names) and the GPU check's CPU dry run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from airlock.cluster.placement import WEIGHTS_SHARE, placement_of, weights_resource
from airlock.cluster.worker import worker_name
from airlock.config import Settings

REPO = Path(__file__).resolve().parents[2]


def test_weights_resource_names_the_weights_not_their_path() -> None:
    assert weights_resource("tiny-random") == "weights-tiny-random"
    assert weights_resource("embedded:smollm2-135m") == "weights-embedded-smollm2-135m"
    assert weights_resource("/models/Frontier-RC1/") == "weights-frontier-rc1"
    assert weights_resource("///") == "weights-model"


def test_placement_asks_for_the_weights_and_gpus_of_the_device() -> None:
    cpu = placement_of({"model": "tiny-random"}).options()
    assert cpu == {"num_cpus": 1.0, "num_gpus": 0.0, "resources": {"weights-tiny-random": WEIGHTS_SHARE}}
    assert placement_of({"model": "m", "device": "cuda"}).options()["num_gpus"] == 1.0
    assert placement_of({"model": "m", "device": "cuda", "num_gpus": 4}).options()["num_gpus"] == 4.0


def test_equal_backend_configs_share_one_worker() -> None:
    assert worker_name({"model": "a", "seed": 1}) == worker_name({"seed": 1, "model": "a"})
    assert worker_name({"model": "a"}) != worker_name({"model": "b"})


def test_executor_settings_default_to_the_embedded_setup(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    assert settings.executor == "inprocess" and settings.ray_address is None
    assert settings.artifacts_dir == tmp_path
    assert Settings(home=tmp_path, artifacts=tmp_path / "shared").artifacts_dir == tmp_path / "shared"
    with pytest.raises(ValueError):
        Settings(executor="kubernetes")  # type: ignore[arg-type]


def test_gpu_check_script_parses_and_runs_on_cpu() -> None:
    assert subprocess.run(["bash", "-n", str(REPO / "scripts" / "gpu-check.sh")]).returncode == 0
    # The same three checks as on a GPU, on the CPU with the tiny model: every figure is reported.
    args = [
        "--device",
        "cpu",
        "--model",
        "tiny-random",
        "--tokens",
        "4",
        "--streams",
        "2",
        "--steps",
        "2",
        "--calls",
        "2",
    ]
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu-check.sh"), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout[done.stdout.index("\n{") :])
    assert report["dtype"] == "float32" and report["device"].startswith("cpu")
    assert report["serve"]["single_stream_tokens_per_s"] > 0 and report["serve"]["concurrent_streams"] == 2
    assert report["finetune"]["steps"] == 2 and report["finetune"]["steps_per_s"] > 0
    assert report["interp"]["calls"] == 2 and report["interp"]["trace_calls_per_s"] > 0
