"""The `airlock` CLI names relied on by operators: init, evaluator, grant, key, audit, models."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from typer.testing import CliRunner

from airlock.cli import app
from tests.conftest import FAKE_MANIFEST

runner = CliRunner()


def invoke(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def test_init_creates_data_dir_manifest_and_admin_token(airlock_env: Path) -> None:
    out = invoke("init")
    assert (airlock_env / "airlock.yaml").exists() and (airlock_env / "airlock.db").exists()
    token = (airlock_env / "admin-token").read_text().strip()
    assert token.startswith("at_") and token in out
    assert oct((airlock_env / "admin-token").stat().st_mode)[-3:] == "600"
    again = invoke("init")
    assert "kept existing manifest" in again and "admin token" not in again


def test_grant_lifecycle_through_cli(airlock_env: Path) -> None:
    invoke("init", "--no-admin-token")
    (airlock_env / "airlock.yaml").write_text(yaml.safe_dump(FAKE_MANIFEST))
    assert "created" in invoke("models", "sync")
    assert "m1@v1" in invoke("models", "list")
    invoke("evaluator", "add", "Org A", "--contact", "a@example.org")
    assert "Org A" in invoke("evaluator", "list")
    grant_id = invoke(
        "grant",
        "create",
        "--evaluator",
        "Org A",
        "--model",
        "m1",
        "--variants",
        "production,helpful-only",
        "--scopes",
        "sample,logprobs",
        "--expires",
        "30d",
    ).strip()
    assert grant_id.startswith("grant_")
    key = invoke("key", "create", "--grant", grant_id).strip()
    assert key.startswith("ak_") and len(key) > 40
    listing = json.loads(invoke("grant", "list", "--json"))
    assert [(g["id"], g["status"], g["variants"]) for g in listing] == [
        (grant_id, "active", ["helpful-only", "production"])
    ]
    assert "revoked" in invoke("grant", "revoke", grant_id, "--reason", "test")
    assert json.loads(invoke("grant", "list", "--json"))[0]["revoked_reason"] == "test"
    assert invoke("audit", "tail") is not None


def test_cli_errors_are_one_line_and_nonzero(airlock_env: Path) -> None:
    invoke("init", "--no-admin-token")
    (airlock_env / "airlock.yaml").write_text(yaml.safe_dump(FAKE_MANIFEST))
    invoke("models", "sync")
    cases = [
        ["grant", "create", "--evaluator", "ghost", "--model", "m1", "--variants", "production"],
        ["evaluator", "add", ""],
        ["grant", "revoke", "grant_nope"],
        ["key", "create", "--grant", "grant_nope"],
    ]
    invoke("evaluator", "add", "Org B")
    cases.append(
        [
            "grant",
            "create",
            "--evaluator",
            "Org B",
            "--model",
            "m1",
            "--variants",
            "production",
            "--expires",
            "tomorrow",
        ]
    )
    cases.append(["grant", "create", "--evaluator", "Org B", "--model", "m1", "--variants", "nope"])
    for args in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 1, (args, result.output)
        assert "error:" in result.output and "Traceback" not in result.output


def test_bad_manifest_fails_serve_with_clear_message(airlock_env: Path) -> None:
    invoke("init", "--no-admin-token")
    (airlock_env / "airlock.yaml").write_text("models:\n  - name: x\n")
    result = runner.invoke(app, ["serve", "--port", "1"])
    assert result.exit_code == 1
    assert "models.0.versions" in result.output


def test_version_flag_prints_the_package_version() -> None:
    import tomllib

    from airlock import __version__

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"airlock {__version__}"
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert pyproject["project"]["version"] == __version__
