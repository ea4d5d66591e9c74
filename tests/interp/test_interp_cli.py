"""`airlock interp` end to end: submit an example with --wait, fetch its result, review a held one."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from airlock.cli import app
from tests.conftest import REPO, Lab, needs_bwrap, running_lab

pytestmark = needs_bwrap
runner = CliRunner()
MANIFEST = {
    "models": [
        {
            "name": "tiny",
            "versions": [{"label": "v1", "weights": "tiny-random", "variants": [{"name": "helpful-only"}]}],
        }
    ]
}


@pytest.fixture
def cli_lab(db_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Lab]:
    """A lab on ``db_url``, with the CLI pointed at it (HTTP for evaluators, the database for the lab)."""
    from airlock.config import reset_settings
    from airlock.db import Database

    monkeypatch.setenv("AIRLOCK_DATABASE_URL", db_url)
    monkeypatch.setenv("AIRLOCK_INTERP_REVIEW_OVER_BYTES", "2000")
    reset_settings()
    database = Database(db_url)
    database.migrate()
    try:
        with running_lab(database, MANIFEST) as lab:
            # Logs are read after the result is saved: a grant that keeps no content would have dropped them.
            _gid, key = lab.grant(model="tiny", variants=["helpful-only"], scopes=["interp"], retention_interp="full")
            lab.accept_terms(key)
            monkeypatch.setenv("AIRLOCK_BASE_URL", lab.url + "/v1")
            monkeypatch.setenv("AIRLOCK_API_KEY", key)
            yield lab
    finally:
        database.dispose()


def invoke(*args: str, code: int = 0) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == code, result.output
    return result.output


def test_submit_wait_result_and_review(cli_lab: Lab, tmp_path: Path) -> None:
    example = REPO / "examples" / "interp" / "logit_lens.py"
    out = invoke(
        "interp", "submit", str(example), "--model", "tiny/helpful-only", "--arg", 'prompt="Paris is in"',
        "--arg", "top_k=2", "--wait", "--out", str(tmp_path / "lens"),
    )  # fmt: skip
    assert "submitted ijob_" in out and "job started" in out and "status=succeeded" in out
    saved = json.loads((tmp_path / "lens" / "result.json").read_text())
    assert saved["value"]["prompt"] == "Paris is in" and len(saved["value"]["layers"]) == 2
    assert all(len(layer["tokens"]) == 2 for layer in saved["value"]["layers"])
    job_id = saved["job_id"]
    assert job_id in invoke("interp", "list")
    assert "layer  0:" in invoke("interp", "status", job_id)

    # A result over the review threshold waits; the evaluator's `result` explains why.
    big = tmp_path / "big.py"
    big.write_text("import numpy as np\ndef main(n):\n    return {'x': np.arange(n, dtype=np.float32)}\n")
    out = invoke("interp", "submit", str(big), "--model", "tiny/helpful-only", "--arg", "n=1000", "--wait")
    assert "status=awaiting_review" in out
    held = out.split("submitted ")[1].split()[0]
    refused = invoke("interp", "result", held, "--out", str(tmp_path / "held"), code=1)
    assert "awaiting review" in refused
    assert held in invoke("interp", "review", "list")
    assert "np.arange(n" in invoke("interp", "review", "show", held)
    assert "result approved" in invoke("interp", "review", "approve", held, "--reviewer", "rita")
    invoke("interp", "result", held, "--out", str(tmp_path / "held"))
    with np.load(tmp_path / "held" / "arrays.npz") as arrays:
        assert np.array_equal(arrays["a0"], np.arange(1000, dtype=np.float32))

    # Bad input is one clear line, not a traceback.
    bad = invoke("interp", "submit", str(big), "--model", "tiny/helpful-only", "--arg", "not-a-pair", code=1)
    assert "--arg takes NAME=VALUE" in bad
    missing = invoke("interp", "review", "deny", "ijob_nope", "--reason", "x", code=1)
    assert "does not exist" in missing
