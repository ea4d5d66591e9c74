"""Public ledger API over real HTTP, and the export → offline verify → access table path end to end."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from airlock.config import reset_settings
from airlock.evals.attestation import generate_key, public_key_b64, sign
from airlock.ledger._merkle import leaf_hash, verify_consistency, verify_inclusion
from airlock.ledger._note import Verifier, verify_checkpoint
from tests.conftest import HTTP_TIMEOUT, Lab
from tests.fakes import fake_attestation

REPO = Path(__file__).resolve().parents[2]


def _b64(value: str) -> bytes:
    return base64.b64decode(value)


def _attested_result(lab: Lab, tmp_path: Path) -> str:
    """Issue a grant to org-a, submit one signed result through the API; return the grant id."""
    grant_id, key = lab.grant("org-a", scopes=["sample", "finetune"])
    private = generate_key(tmp_path / "org-a.pem")
    http = httpx.Client(
        base_url=lab.url + "/v1/airlock", headers={"Authorization": f"Bearer {key}"}, timeout=HTTP_TIMEOUT
    )
    assert http.post("/signing-keys", json={"public_key": public_key_b64(private)}).status_code == 201
    attestation = fake_attestation(grant_id, elicitation={"epochs": 1, "fine_tuned": False})
    resp = http.post("/results", json=sign(attestation, private))
    assert resp.status_code == 201, resp.text
    http.close()
    return grant_id


def test_public_endpoints_serve_verifiable_proofs(lab: Lab, tmp_path: Path) -> None:
    """Checkpoint, entries and proofs need no credentials and verify against the published key."""
    from airlock.ledger import service

    # The gateway's background sequencer integrates the manifest's events without being asked.
    deadline = time.monotonic() + 15
    while True:
        with lab.db.session() as session:
            if service.tree_head(session).size >= 6 and service.pending_count(session) == 0:
                break
        assert time.monotonic() < deadline, "the background sequencer did not integrate pending events"
        time.sleep(0.1)
    admin = {"Authorization": f"Bearer {lab.admin_token}"}
    first = httpx.post(lab.url + "/v1/airlock/admin/ledger/checkpoint", headers=admin, timeout=HTTP_TIMEOUT)
    assert first.status_code == 201, first.text
    _attested_result(lab, tmp_path)
    assert httpx.post(lab.url + "/v1/airlock/admin/ledger/checkpoint", timeout=HTTP_TIMEOUT).status_code == 401
    assert (
        httpx.post(lab.url + "/v1/airlock/admin/ledger/checkpoint", headers=admin, timeout=HTTP_TIMEOUT).status_code
        == 201
    )
    public = httpx.Client(base_url=lab.url + "/public/ledger", timeout=HTTP_TIMEOUT)
    verifier = Verifier.parse(public.get("/pubkey").text)
    cp = verify_checkpoint(public.get("/checkpoint").text, verifier)
    old = verify_checkpoint(first.json()["note"], verifier)
    assert cp.size > old.size > 0
    page = public.get("/entries", params={"start": 0, "end": cp.size}).json()
    assert [e["index"] for e in page["entries"]] == list(range(cp.size))
    kinds = [e["entry"].split('"kind":"', 1)[1].split('"', 1)[0] for e in page["entries"]]
    assert {"variant.registered", "stage.changed", "grant.issued", "eval.attested"} <= set(kinds)
    for e in page["entries"]:
        assert _b64(e["leaf_hash"]) == leaf_hash(e["entry"].encode())
        p = public.get("/proof/inclusion", params={"index": e["index"], "size": cp.size}).json()
        verify_inclusion(_b64(p["leaf_hash"]), e["index"], cp.size, [_b64(h) for h in p["proof"]], cp.root)
    c = public.get("/proof/consistency", params={"old": old.size, "new": cp.size}).json()
    verify_consistency(old.size, cp.size, [_b64(h) for h in c["proof"]], old.root, cp.root)
    for path, params in (
        ("/proof/inclusion", {"index": cp.size, "size": cp.size}),
        ("/proof/inclusion", {"index": 0, "size": cp.size + 100}),
        ("/proof/consistency", {"old": cp.size, "new": old.size}),
        ("/proof/consistency", {"old": 0, "new": cp.size}),
        ("/entries", {"start": cp.size + 5, "end": cp.size + 9}),
        ("/entries", {"start": "x", "end": 3}),
    ):
        resp = public.get(path, params=params)
        assert resp.status_code == 400, (path, params, resp.text)
        assert resp.json()["error"]["type"] == "invalid_request_error"
    public.close()
    rows = [r for r in lab.audit_rows() if r.path.startswith("/public/ledger")]
    assert rows and all(r.actor_type == "anonymous" for r in rows)


def test_export_and_offline_verify_answer_the_public_questions(
    lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Export, then `airlock-verify --model m1`: who had access, how long before deployment, what was attested."""
    from airlock.ledger.cli import app
    from airlock.registry import service as registry

    grant_id = _attested_result(lab, tmp_path)
    with lab.db.session() as session:
        version = registry.get_version(session, registry.get_model(session, "m1"), "v1")
        registry.set_stage(session, version, "deployed", actor="release-manager")
    monkeypatch.setenv("AIRLOCK_DATABASE_URL", lab.db.url)
    reset_settings()
    runner = CliRunner()
    bundle, key = tmp_path / "bundle.json", tmp_path / "lab.vkey"
    result = runner.invoke(app, ["export", "--out", str(bundle)])
    assert result.exit_code == 0, result.output
    assert runner.invoke(app, ["pubkey", "--out", str(key)]).exit_code == 0
    result = runner.invoke(app, ["check"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["checkpoint", "--force"])
    assert result.exit_code == 0 and result.output.startswith("airlock.invalid/ledger\n"), result.output
    assert "pending: 0" in runner.invoke(app, ["status"]).output
    grant_entry = next(e for e in json.loads(bundle.read_text())["entries"] if '"grant.issued"' in e)
    result = runner.invoke(app, ["reveal", json.loads(grant_entry)["id"], "--field", "notes", "--no-publish"])
    assert result.exit_code == 0 and '"field": "notes"' in result.output, result.output
    verify = subprocess.run(
        [str(Path(sys.executable).with_name("airlock-verify")), str(bundle), "--key", str(key), "--model", "m1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    out: Any = verify.stdout
    assert "key: pinned and matching" in out and "OK:" in out
    assert "org-a" in out and grant_id in out and "knowledge_proxy" in out and "mean_score=0.5" in out
    assert "0.0" in out  # deployed the same day as access began
    bundle.write_text(bundle.read_text().replace('\\"evaluator\\":\\"org-a\\"', '\\"evaluator\\":\\"org-x\\"'))
    result = runner.invoke(app, ["verify", str(bundle), "--key", str(key)])
    assert result.exit_code == 1 and "FAILED" in result.output
