"""The interp job handler: a job interrupted by a restart runs again and is recorded; the variant's system prompt."""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import Any

import pytest
from sqlalchemy import update

from airlock.access import service as access
from airlock.backends.protocol import ChatCompletion, ChatCompletionRequest, ChatMessage
from airlock.config import get_settings
from airlock.ids import parse_model_id
from airlock.interp import jobs as interp_jobs
from airlock.interp import service as interp
from airlock.interp.jobs import KIND, InterpHandler
from airlock.interp.models import InterpJob
from airlock.interp.run import JobSpec, RunOutcome
from airlock.interp.schemas import InterpJobCreate
from airlock.interp.workers import ModelWorker, ThreadWorker
from airlock.jobs.models import Job
from airlock.jobs.runner import JobRunner
from airlock.mitigations import build_pipeline
from airlock.registry.service import parse_manifest, resolve_variant, sync_manifest
from tests.conftest import needs_bwrap
from tests.fakes import EchoBackend

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


@needs_bwrap
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
    kind, entry, confidential = recorded[-1]
    assert kind == "interp.job" and entry["job_id"] == job_id and entry["status"] == "succeeded"
    assert entry["model_version_hash"] and entry["result_sha256"] == result.result_sha256
    # The grant keeps no content (retention_interp=none): the entry commits to the arguments' hash only.
    digest = hashlib.sha256(json.dumps({"prompt": "hello"}, sort_keys=True).encode()).hexdigest()
    assert confidential is not None and confidential["args"] == {"sha256": digest}
    assert len(confidential["code_sha256"]) == 64


def _system_prompt(name: str, prompt: str, mode: str) -> dict[str, Any]:
    config = {"prompt": prompt, "mode": mode}
    return {"name": name, "kind": "system_prompt", "stance": "disabled_for_eval", "config": config}


FILTER = {"name": "screen", "kind": "input_filter", "stance": "disabled_for_eval", "config": {"patterns": ["x{9}"]}}
# Two system prompts in each order of modes (and a filter between them, which changes no prompt).
PROMPT_VARIANTS = {
    "stacked": [_system_prompt("a", "First.", "prepend"), FILTER, _system_prompt("b", "Second.", "prepend")],
    "replaced": [_system_prompt("a", "First.", "prepend"), FILTER, _system_prompt("b", "Second.", "replace")],
    "replaced-first": [_system_prompt("a", "First.", "replace"), _system_prompt("b", "Second.", "prepend")],
}


class _Recording(EchoBackend):
    """The serving side's backend: records the chat requests the pipeline sends on."""

    def __init__(self) -> None:
        super().__init__({})
        self.requests: list[ChatCompletionRequest] = []

    async def chat(self, request: ChatCompletionRequest) -> ChatCompletion:
        self.requests.append(request)
        return await super().chat(request)


def test_interp_gets_the_system_prompt_the_chat_pipeline_sends(
    db: Any, tiny_worker: ThreadWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("airlock.ledger.service.record_event", lambda *args, **kwargs: None)
    specs: list[JobSpec] = []

    async def run_job(spec: JobSpec, worker: ModelWorker, limits: Any, **kwargs: Any) -> RunOutcome:
        specs.append(spec)
        return RunOutcome(value={}, logs="", usage={"cpu_seconds": 0.0, "rpc": {"model_seconds": 0.0}}, error=None)

    monkeypatch.setattr(interp_jobs, "run_job", run_job)
    variants = [{"name": name, "mitigations": mitigations} for name, mitigations in PROMPT_VARIANTS.items()]
    manifest = {
        "models": [{"name": "tiny", "versions": [{"label": "v1", "weights": "tiny-random", "variants": variants}]}]
    }
    runner = JobRunner(db, {KIND: InterpHandler(db, get_settings(), lambda spec: tiny_worker)})
    with db.session() as session:
        sync_manifest(session, parse_manifest(manifest))
        access.create_evaluator(session, "org")
        grant = access.create_grant(
            session,
            access.GrantRequest(evaluator="org", model="tiny", variants=list(PROMPT_VARIANTS), scopes=["interp"]),
        )
        key, _token = access.create_api_key(session, grant.id)
        principal = access.Principal(
            key_id=key.id, grant_id=grant.id, evaluator_id=grant.evaluator_id, evaluator_name="org", grant=grant
        )
        served = {name: resolve_variant(session, parse_model_id(f"tiny/{name}")) for name in PROMPT_VARIANTS}
    for name, variant in served.items():
        with db.session() as session:
            body = InterpJobCreate(model=f"tiny/{name}", code="def main():\n    return {}\n")
            interp.create_job(session, get_settings(), principal, body)
        assert runner.run_once()
        backend = _Recording()
        question = ChatCompletionRequest(model=f"tiny/{name}", messages=[ChatMessage(role="user", content="hello")])
        asyncio.run(build_pipeline(backend, variant.mitigations).chat(question))
        sent = backend.requests[0].messages[0]
        assert sent.role == "system", name
        assert specs[-1].system_prompt == sent.text(), name
    assert [spec.system_prompt for spec in specs] == ["Second.\n\nFirst.", "Second.", "Second.\n\nFirst."]
