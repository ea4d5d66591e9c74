"""`airlock report ...`: evaluator commands over HTTP, lab commands on the database, offline checks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from airlock.cli import app
from airlock.config import reset_settings
from tests.conftest import HTTP_TIMEOUT, Lab
from tests.publish.report_fixtures import make_org, tiny_png

runner = CliRunner()


def invoke(*args: str, code: int = 0) -> str:
    result = runner.invoke(app, list(args), env={"COLUMNS": "400"})
    assert result.exit_code == code, result.output
    return result.output


def test_draft_submit_agree_publish_reveal_verify(lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import httpx

    org = make_org(lab.db, tmp_path, embargo_days=14)
    result_id, key = org.attest(lab.db), org.token
    monkeypatch.setenv("AIRLOCK_BASE_URL", lab.url + "/v1")
    monkeypatch.setenv("AIRLOCK_API_KEY", key)
    monkeypatch.setenv("AIRLOCK_DATABASE_URL", lab.db.url)
    reset_settings()

    md = tmp_path / "report.md"
    md.write_text("# Refusal robustness\n\nSee [[redact:hazard]]the zyloxin prompt[[/redact]].\n")
    plot = tmp_path / "plot.png"
    plot.write_bytes(tiny_png())
    out = invoke("report", "draft", str(md), "--model", "m1@v1", "--result", result_id, "--plot", str(plot))
    match = re.search(r"report (rpt_[0-9a-f]+)\s+draft\s+revision 1", out)
    assert match, out
    rid = match.group(1)
    assert "Refusal robustness" in out and "redaction #1 (hazard)" in out

    md.write_text("# Refusal robustness\n\nSee [[redact:hazard]]the zyloxin prompt[[/redact]]. Revised.\n")
    assert "revision 2" in invoke("report", "draft", str(md), "--report", rid)
    out = invoke("report", "submit", rid)
    assert "submitted" in out and "at the latest (30 business days, eu calendar, 0 extension(s))" in out
    assert rid in invoke("report", "list")
    from airlock.access.service import create_admin_token

    with lab.db.session() as session:
        decider = create_admin_token(session, "dana", "decider")[1]
    why = ["--justification", "A disclosure to the affected vendor is still in progress."]
    refused = invoke("report", "extend", rid, "--days", "5", *why, "--token", lab.admin_token, code=1)
    assert "only the policy's decider role" in refused
    out = invoke("report", "extend", rid, "--days", "5", *why, "--token", decider)
    assert f"extended {rid} by 5 business day(s)" in out and "report.extended" in out
    invoke("report", "comment", rid, "Lab view: fine to publish.", "--as", "alice")
    assert "waiting for the evaluator" in invoke("report", "agree-release", rid, "--as", "alice")
    out = invoke("report", "request-release", rid)
    assert "published" in out and f"/public/reports/{rid}" in out
    assert "0 report(s) published" in invoke("report", "publish-due")

    out = invoke("report", "reveal", rid, "1")
    assert "revealed" in out
    from airlock.evals.attestation import public_key_b64

    pinned = public_key_b64(org.private)
    assert "1 revealed span(s) verified" in invoke("report", "verify", rid, "--key", pinned)
    assert "no evaluator key is pinned" in invoke("report", "verify", rid, code=1)
    page = httpx.get(f"{lab.url}/public/reports/{rid}", timeout=HTTP_TIMEOUT).json()
    span = page["redactions"][0]
    ok = invoke(
        "report", "verify-reveal", "--commitment", span["commitment"], "--salt", span["salt"], "--text", span["text"]
    )
    assert ok.startswith("OK")
    bad = invoke(
        "report", "verify-reveal", "--commitment", span["commitment"], "--salt", span["salt"], "--text", "x", code=1
    )
    assert "MISMATCH" in bad
    saved = tmp_path / "page.json"
    saved.write_text(
        httpx.get(f"{lab.url}/public/reports/{rid}", timeout=HTTP_TIMEOUT).text.replace("Revised.", "Edited.")
    )
    assert "content_hash does not match" in invoke("report", "verify", str(saved), "--key", pinned, code=1)
    assert "404" in invoke("report", "show", "rpt_unknown", code=1)
    assert "lab comment by alice" in invoke("report", "show", rid)
