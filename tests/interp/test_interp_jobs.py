"""The interp job handler on the persistent queue: a job interrupted by a restart runs again, and is recorded."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import update

from airlock.access import service as access
from airlock.config import get_settings
from airlock.interp import service as interp
from airlock.interp.jobs import KIND, InterpHandler
from airlock.interp.models import InterpJob
from airlock.interp.schemas import InterpJobCreate
from airlock.interp.workers import ThreadWorker
from airlock.jobs.models import Job
from airlock.jobs.runner import JobRunner
from airlock.registry.service import parse_manifest, sync_manifest
from tests.conftest import needs_bwrap

pytestmark = needs_bwrap
SYSTEM_PROMPT = {
    "name": "sp",
    "kind": "system_prompt",
    "stance": "disabled_for_eval",
    "config": {"prompt": "Be careful."},
}
VARIANT = {"name": "production", "mitigations": [SYSTEM_PROMPT]}
MANIFEST = {
    "models": [{"name": "tiny", "versions": [{"label": "v1", "weights": "tiny-random", "variants": [VARIANT]}]}]
}

CODE = """
from airlock.interp import client
def main(prompt):
    result = client.trace(prompt, chat=True, logits=False, read=["model.layers.0"])
    try:
        client.trace(prompt, positions=0, chat=True)
        refused = None
    except client.RemoteError as exc:
        refused = str(exc)
    return {"tokens": result.tokens[0], "first": result.positions[0][0], "refused": refused}
"""


def test_a_job_interrupted_by_a_restart_runs_again_and_reaches_the_ledger(
    db: Any, tiny_worker: ThreadWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorded: list[tuple[str, dict[str, Any], dict[str, Any] | None]] = []
    monkeypatch.setattr(
        "airlock.ledger.service.record_event",
        lambda session, kind, body, *, confidential=None: recorded.append((kind, body, confidential)),
    )
    with db.session() as session:
        sync_manifest(session, parse_manifest(MANIFEST))
        access.create_evaluator(session, "org")
        grant = access.create_grant(
            session, access.GrantRequest(evaluator="org", model="tiny", variants=["production"], scopes=["interp"])
        )
        key, _token = access.create_api_key(session, grant.id)
        principal = access.Principal(
            key_id=key.id, grant_id=grant.id, evaluator_id=grant.evaluator_id, evaluator_name="org", grant=grant
        )
        body = InterpJobCreate(model="tiny/production", code=CODE, args={"prompt": "hello"})
        job_id = interp.create_job(session, get_settings(), principal, body).id
        # The gateway died while the job ran: running, with no live heartbeat.
        session.execute(update(Job).where(Job.id == job_id).values(status="running", worker_id="dead", attempts=1))

    handler = InterpHandler(db, get_settings(), lambda spec: tiny_worker)
    runner = JobRunner(db, {KIND: handler}, stale_after=1.0)
    assert runner.recover() == [job_id]
    assert runner.run_once()
    with db.session() as session:
        job, row = session.get(Job, job_id), session.get(InterpJob, job_id)
        assert job is not None and row is not None
        assert job.status == "succeeded" and job.attempts == 2, job.error
        assert row.usage["rpc"]["calls"]["trace"] == 2 and row.cpu_seconds > 0
        result = interp.released_result(get_settings().home_dir, job, row)
    # The variant's system prompt is part of the chat-formatted prompt the model saw, but the
    # evaluator sees neither its text nor its activations.
    tokens = result.value["tokens"]
    hidden = tokens.count("<system>")
    assert hidden > 3 and tokens[:hidden] == ["<system>"] * hidden and "careful" not in "".join(tokens)
    assert result.value["first"] == hidden
    assert "lies in the variant's system prompt" in result.value["refused"]
    kind, body, confidential = recorded[-1]
    assert kind == "interp.job" and body["job_id"] == job_id and body["status"] == "succeeded"
    assert body["model_version_hash"] and body["result_sha256"] == result.result_sha256
    assert confidential is not None and confidential["args"] == {"prompt": "hello"}
    assert len(confidential["code_sha256"]) == 64
