"""The running gateway against its own OpenAPI document (schemathesis): no server errors, no schema violations.

Every documented operation is fuzzed over real HTTP on a fake-backend lab: evaluator routes with
an evaluator key holding every scope, lab routes with an admin token (in a second run, since the
lab routes revoke keys). Each response must be a non-5xx the document lists for the operation,
with the documented content type, headers and body schema; undeclared methods must get 405 with
a correct ``Allow``; credentials must be enforced. The document and the behaviour it describes are
also pinned by targeted tests below.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import Status, events, from_schema

from tests.conftest import FAKE_MANIFEST, HTTP_TIMEOUT, Lab, running_lab

#: Examples per operation and generation phase: enough to find what the fuzzer has found so
#: far, small enough for ``make test`` on two cores (raise it to explore; the seed varies it).
MAX_EXAMPLES = int(os.environ.get("AIRLOCK_SCHEMATHESIS_EXAMPLES", "20"))
SEED = int(os.environ.get("AIRLOCK_SCHEMATHESIS_SEED", "1103"))
# Every check schemathesis has but one. A static schema cannot state every rule a valid request
# must meet (a model id that exists, code that compiles, a signature that verifies, a named tool
# that was offered), so "schema-valid yet refused" is no defect in itself; the refusals that were
# mismatches between schema and server are pinned by their own tests below.
DISABLED_CHECKS = ("positive_data_acceptance",)


@pytest.fixture
def fuzz_lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Lab]:
    """A fake-backend lab on SQLite with no job worker (fuzzed jobs must not run)."""
    from airlock.config import reset_settings
    from airlock.db import Database

    monkeypatch.setenv("AIRLOCK_RUN_JOBS", "false")
    reset_settings()
    database = Database(f"sqlite:///{tmp_path / 'fuzz.db'}")
    database.migrate()
    try:
        with running_lab(database, FAKE_MANIFEST) as lab:
            yield lab
    finally:
        database.dispose()


def _lab_operations(document: dict[str, Any]) -> set[tuple[str, str]]:
    """Return the (METHOD, path) of every operation the document says takes a lab token."""
    return {
        (method.upper(), path)
        for path, item in document["paths"].items()
        for method, operation in item.items()
        if any("labToken" in requirement for requirement in operation.get("security", []))
    }


def _config(token: str) -> SchemathesisConfig:
    return SchemathesisConfig.from_dict(
        {
            "seed": SEED,
            "workers": 1,
            # Hypothesis's health checks judge the generator's efficiency on a busy machine, not the API.
            "suppress-health-check": ["all"],
            "headers": {"Authorization": f"Bearer {token}"},
            "generation": {"max-examples": MAX_EXAMPLES, "database": "none"},
            "phases": {"examples": {"enabled": True}, "coverage": {"enabled": True}, "fuzzing": {"enabled": True}},
            "checks": {"enabled": True, **{name: {"enabled": False} for name in DISABLED_CHECKS}},
        }
    )


def _fuzz(schema: schemathesis.BaseSchema) -> tuple[list[str], int]:
    """Run every phase over ``schema``; return one line per failed check or engine error, and the cases run."""
    problems: list[str] = []
    cases = 0
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            cases += len(event.recorder.cases)
            for checks in event.recorder.checks.values():
                for check in checks:
                    if check.status == Status.FAILURE and check.failure_info is not None:
                        failure = check.failure_info.failure
                        problems.append(
                            f"{event.recorder.label} [{check.name}] {failure.title}: {failure.message}\n"
                            f"    {check.failure_info.code_sample}"
                        )
        elif isinstance(event, events.NonFatalError):
            problems.append(f"{event.label}: engine error {event.value!r}")
        elif isinstance(event, events.FatalError):
            problems.append(f"fatal engine error {event.exception!r}")
    return sorted(set(problems)), cases


def _run_surface(lab: Lab, token: str, *, lab_routes: bool) -> None:
    schema = schemathesis.openapi.from_url(lab.url + "/openapi.json", config=_config(token))
    lab_ops = _lab_operations(schema.raw_schema)
    schema = schema.include(
        func=lambda ctx: ((ctx.operation.method.upper(), ctx.operation.path) in lab_ops) == lab_routes
    )
    problems, cases = _fuzz(schema)
    assert cases > 0
    assert not problems, f"{len(problems)} conformance failure(s):\n" + "\n".join(problems)


def test_evaluator_and_public_surface_conforms(fuzz_lab: Lab) -> None:
    _gid, key = fuzz_lab.grant(
        variants=["production", "helpful-only", "base"], scopes=["sample", "logprobs", "finetune", "interp"]
    )
    _run_surface(fuzz_lab, key, lab_routes=False)


def test_lab_surface_conforms(fuzz_lab: Lab) -> None:
    fuzz_lab.grant()  # something for the lab routes to list, key and revoke
    _run_surface(fuzz_lab, fuzz_lab.admin_token, lab_routes=True)


# ---------------------------------------------------------------- the document itself


def _document(lab: Lab) -> dict[str, Any]:
    document: dict[str, Any] = httpx.get(lab.url + "/openapi.json", timeout=HTTP_TIMEOUT).json()
    return document


def test_every_operation_lists_its_errors_with_the_shared_schema(lab: Lab) -> None:
    document = _document(lab)
    error = {"$ref": "#/components/schemas/ErrorResponse"}
    assert set(document["components"]["schemas"]["ErrorResponse"]["properties"]) == {"error"}
    for path, item in document["paths"].items():
        for method, operation in item.items():
            responses = operation["responses"]
            assert "422" not in responses, (method, path)  # validation errors are 400s
            for status, response in responses.items():
                if int(status) >= 400:
                    assert response["content"]["application/json"]["schema"] == error, (method, path, status)
            if operation.get("security"):
                assert {"401", "403"} <= set(responses), (method, path)
            if "{" in path:
                assert "404" in responses, (method, path)
    chat = document["paths"]["/v1/chat/completions"]["post"]
    assert {"400", "401", "403", "404", "413", "429", "502", "503"} <= set(chat["responses"])
    assert chat["security"] == [{"evaluatorKey": []}]
    assert "Retry-After" in chat["responses"]["429"]["headers"]
    grants = document["paths"]["/v1/airlock/admin/grants"]["post"]
    assert grants["security"] == [{"labToken": []}]
    assert "security" not in document["paths"]["/public/ledger/checkpoint"]["get"]


def test_the_route_table_names_only_documented_operations(lab: Lab) -> None:
    from airlock.web.openapi import ROUTE_RESPONSES

    # A renamed route must not leave its extra responses behind, silently undocumented.
    paths = _document(lab)["paths"]
    assert [key for key in ROUTE_RESPONSES if key[1] not in paths or key[0].lower() not in paths[key[1]]] == []


def test_schema_states_the_message_rules_the_server_enforces(lab: Lab) -> None:
    _gid, key = lab.grant()
    headers = {"Authorization": f"Bearer {key}"}

    def post(path: str, body: dict[str, Any]) -> httpx.Response:
        return httpx.post(
            lab.url + path, json={"model": "m1/helpful-only", **body}, headers=headers, timeout=HTTP_TIMEOUT
        )

    # Accepted: an empty prompt, a tool message that names its call, an assistant message with calls.
    assert post("/v1/completions", {"prompt": ""}).status_code == 200
    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{}"}}
    history = [
        {"role": "user", "content": "add"},
        {"role": "assistant", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "5"},
    ]
    assert post("/v1/chat/completions", {"messages": history}).status_code == 200
    # Refused, and the document says so: a tool message without its call id, calls on a user message.
    assert post("/v1/chat/completions", {"messages": [{"role": "tool", "content": "5"}]}).status_code == 400
    assert post("/v1/chat/completions", {"messages": [{"role": "user", "tool_calls": [call]}]}).status_code == 400
    message = _document(lab)["components"]["schemas"]["ChatMessage"]
    rules = {
        (rule["if"]["properties"]["role"].get("const"), tuple(rule["then"].get("required", [])))
        for rule in message["allOf"]
    }
    assert ("tool", ("tool_call_id",)) in rules
    assert message["properties"]["tool_calls"]["anyOf"][0]["items"] == {"$ref": "#/components/schemas/ToolCall"}
    # A report patch must change something: refused at the server, stated in the schema.
    update = _document(lab)["components"]["schemas"]["ReportUpdate"]
    assert {tuple(branch["required"]) for branch in update["anyOf"]} == {
        ("title",),
        ("body",),
        ("result_ids",),
        ("attachment_ids",),
    }


def test_options_and_wrong_methods_name_every_allowed_method(lab: Lab) -> None:
    _gid, key = lab.grant(scopes=["sample", "finetune"])
    headers = {"Authorization": f"Bearer {key}"}
    for path, allow in [
        ("/v1/files", "GET, POST, OPTIONS"),
        ("/v1/files/file-x", "GET, DELETE, OPTIONS"),
        ("/v1/airlock/reports/attachments", "POST, OPTIONS"),
        ("/v1/fine_tuning/jobs/ftjob-x/cancel", "POST, OPTIONS"),
        ("/v1/airlock/models/m1@v1/production", "GET, OPTIONS"),
    ]:
        options = httpx.options(lab.url + path)
        assert (options.status_code, options.headers["allow"], options.content) == (204, allow, b""), path
    wrong = httpx.put(lab.url + "/v1/files", headers=headers, timeout=HTTP_TIMEOUT)
    assert (wrong.status_code, wrong.headers["allow"]) == (405, "GET, POST, OPTIONS")
    assert wrong.json()["error"]["code"] == "method_not_allowed"
    assert httpx.options(lab.url + "/v1/nothing-here").status_code == 404
    rows = [r for r in lab.audit_rows() if r.method == "OPTIONS"]
    assert len(rows) == 6 and {r.status_code for r in rows} == {204, 404}


def test_get_on_a_post_only_job_action_is_405_not_a_weights_refusal(lab: Lab) -> None:
    _gid, key = lab.grant(scopes=["sample", "finetune"])
    for headers in ({"Authorization": f"Bearer {key}"}, {}):
        resp = httpx.get(lab.url + "/v1/fine_tuning/jobs/ftjob-x/cancel", headers=headers, timeout=HTTP_TIMEOUT)
        assert (resp.status_code, resp.headers["allow"]) == (405, "POST, OPTIONS"), resp.text
        assert resp.json()["error"]["code"] == "method_not_allowed"
    # Paths no documented route serves are still refused as weight exports.
    export = httpx.get(
        lab.url + "/v1/fine_tuning/jobs/ftjob-x/adapter",
        headers={"Authorization": f"Bearer {key}"},
        timeout=HTTP_TIMEOUT,
    )
    assert (export.status_code, export.json()["error"]["code"]) == (403, "weights_export_forbidden")
