"""Policy file validation: the example is valid; mistakes give clear, located errors."""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from airlock.cli import app
from airlock.errors import ConfigError
from airlock.governance.policy import load_policy, parse_policy
from tests.governance.gate_helpers import POLICY, write_policy

runner = CliRunner()


def test_example_policy_is_valid_and_covers_the_frameworks_shape() -> None:
    text = resources.files("airlock").joinpath("data/example-policy.yaml").read_text()
    policy = parse_policy(yaml.safe_load(text))
    assert {d.id for d in policy.domains} == {"bio_chem", "cyber", "autonomy", "ml_rnd"}
    assert {d.status for d in policy.domains} == {"tracked", "research"}
    assert "deployed" in policy.gate.stages and policy.roles.decides == "decider"
    assert policy.claim_rule("input_filter") is not None
    assert policy.sha256() == parse_policy(yaml.safe_load(text)).sha256()


def _broken(mutate: Any) -> str:
    data = copy.deepcopy(POLICY)
    mutate(data)
    with pytest.raises(ConfigError) as info:
        parse_policy(data, source="p.yaml")
    return info.value.message


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (
            lambda d: d["domains"][0].update(status="watched"),
            "domains.0.status: Input should be 'tracked' or 'research'",
        ),
        (lambda d: d["domains"][0]["thresholds"][0]["evals"][0].pop("threshold"), "evals.0.threshold: Field required"),
        (lambda d: d["domains"][0]["thresholds"][0]["evals"][0].update(early_warning=-0.1), "early_warning"),
        (lambda d: d["domains"][0]["thresholds"][0]["elicitation"].update(min_samples=0), "min_samples"),
        (lambda d: d["domains"][0]["thresholds"][0].update(treshold=1), "treshold: Extra inputs are not permitted"),
        (lambda d: d["gate"].update(stages=["internal"]), "`deployed` must be a gated stage"),
        (lambda d: d["roles"].update(decides="ceo"), "roles.decides"),
        (lambda d: d["domains"].append(copy.deepcopy(d["domains"][0])), "duplicate domain ids: bio"),
        (lambda d: d["domains"][0].update(status="research"), "at least one domain must be `tracked`"),
        (lambda d: d.update(domains=[]), "domains: List should have at least 1 item"),
        (lambda d: d["domains"][0].update(id="Bio Chem"), "is not a valid id"),
        (lambda d: d["domains"][0]["thresholds"][0]["evals"][0].update(threshold=float("nan")), "finite"),
    ],
)
def test_policy_errors_are_located_and_readable(mutate: Any, expected: str) -> None:
    message = _broken(mutate)
    assert message.startswith("p.yaml is invalid: ")
    assert expected in message


def test_load_policy_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_policy(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_policy(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_policy(bad)


def test_cli_policy_validate(tmp_path: Path, airlock_env: Path) -> None:
    good = write_policy(tmp_path / "good.yaml")
    result = runner.invoke(app, ["gate", "policy", "validate", str(good)])
    assert result.exit_code == 0, result.output
    assert "valid" in result.output and "bio (tracked)" in result.output
    data = copy.deepcopy(POLICY)
    data["domains"][0]["thresholds"][0]["elicitation"]["min_samples"] = "many"
    bad = write_policy(tmp_path / "bad.yaml", data)
    result = runner.invoke(app, ["gate", "policy", "validate", str(bad)])
    assert result.exit_code == 1
    assert "elicitation.min_samples: Input should be a valid integer" in " ".join(result.output.split())
    # `airlock init` installs the example policy where the gate looks for it.
    assert runner.invoke(app, ["init"]).exit_code == 0
    assert runner.invoke(app, ["gate", "policy", "validate"]).exit_code == 0


def test_public_surface_is_pinned() -> None:
    import airlock.governance as governance

    exported = {name for name in dir(governance) if not name.startswith("_")}
    modules = {"cli", "models", "policy", "routes", "schemas", "service"}
    # __all__ names the re-exported objects and the modules other packages may import.
    assert exported - modules == set(governance.__all__) - modules
