"""The HTTP surface is pinned: every (method, path) and who may call it, read from the app itself.

A route added without authentication, or with a different caller than before, changes this table
and fails here until the table (and with it the security review of the change) is updated.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute, iter_route_contexts

from airlock.app import create_app
from airlock.config import Settings
from airlock.console.routes import console_user
from airlock.db import Database
from airlock.deps import RequirePermission, get_admin, get_principal

# Routes anyone may call without a credential: health, the public record and the API description.
PUBLIC_PREFIXES = ("/public/", "/healthz", "/readyz", "/metrics", "/docs", "/redoc", "/openapi.json", "/ui")


def _callers(dependant: Dependant) -> Iterator[str]:
    for dep in dependant.dependencies:
        call: Any = dep.call
        if isinstance(call, RequirePermission):
            yield f"lab:{call.permission.value}"
            continue  # its own get_admin is the same requirement
        if call is get_principal:
            yield "evaluator"
        elif call is get_admin:
            yield "lab:any"
        elif call is console_user:
            yield "console"  # the page checks the signed-in key's grant or the token's role itself
        yield from _callers(dep)


def surface(app: FastAPI) -> list[tuple[str, str, str]]:
    """Return the sorted (method, path, caller) table of ``app``'s routes."""
    rows: set[tuple[str, str, str]] = set()
    for route in iter_route_contexts(app.routes):  # flattens included routers, prefixes applied
        path = route.path or ""
        if not isinstance(route.original_route, APIRoute):
            rows.update((m, path, "public") for m in sorted(route.methods or {"GET"}))
            continue
        callers = sorted(set(_callers(route.dependant))) or ["public"]
        for method in sorted(route.methods or ()):
            rows.update((method, path, caller) for caller in callers)
    return sorted(rows)


def app_for_inspection(home: Path) -> FastAPI:
    """Build the app without starting it (its routes are all this test reads)."""
    settings = Settings(home=home, database_url=f"sqlite:///{home / 'surface.db'}")
    return create_app(settings, db=Database(settings.db_url), sync_manifest=False)


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, str, str]]:
    return surface(app_for_inspection(tmp_path_factory.mktemp("surface")))


def test_no_route_is_open_unless_it_is_public_by_design(table: list[tuple[str, str, str]]) -> None:
    open_routes = [(m, p) for m, p, who in table if who == "public" and not p.startswith(PUBLIC_PREFIXES)]
    assert open_routes == [], "routes reachable without a credential"


def test_lab_routes_declare_a_permission(table: list[tuple[str, str, str]]) -> None:
    assert [(m, p) for m, p, who in table if who == "lab:any"] == []


def test_the_surface_is_pinned(table: list[tuple[str, str, str]]) -> None:
    assert table == PINNED, "\n".join(
        [f"+ {row}" for row in table if row not in PINNED] + [f"- {row}" for row in PINNED if row not in table]
    )


PINNED: list[tuple[str, str, str]] = [
    ("DELETE", "/v1/files/{file_id}", "evaluator"),
    ("GET", "/docs", "public"),
    ("GET", "/healthz", "public"),
    ("GET", "/metrics", "lab:audit:read"),
    ("GET", "/openapi.json", "public"),
    ("GET", "/public/ledger/checkpoint", "public"),
    ("GET", "/public/ledger/entries", "public"),
    ("GET", "/public/ledger/proof/consistency", "public"),
    ("GET", "/public/ledger/proof/inclusion", "public"),
    ("GET", "/public/ledger/pubkey", "public"),
    ("GET", "/public/reports", "public"),
    ("GET", "/public/reports/{report_id}", "public"),
    ("GET", "/public/reports/{report_id}.html", "public"),
    ("GET", "/public/reports/{report_id}.md", "public"),
    ("GET", "/public/reports/{report_id}/attachments/{attachment_id}", "public"),
    ("GET", "/readyz", "public"),
    ("GET", "/redoc", "public"),
    ("GET", "/tokenizer_info", "evaluator"),
    ("GET", "/ui", "console"),
    ("GET", "/ui/", "console"),
    ("GET", "/ui/docs-assets", "public"),
    ("GET", "/ui/lab", "console"),
    ("GET", "/ui/lab/findings/{finding_id}", "console"),
    ("GET", "/ui/lab/keys", "console"),
    ("GET", "/ui/lab/review", "console"),
    ("GET", "/ui/public", "console"),
    ("GET", "/ui/redteam", "console"),
    ("GET", "/ui/redteam/sessions/{session_id}", "console"),
    ("GET", "/ui/sign-in", "console"),
    ("GET", "/ui/static", "public"),
    ("GET", "/ui/work", "console"),
    ("GET", "/v1/airlock/admin/audit", "lab:audit:read"),
    ("GET", "/v1/airlock/admin/contamination/checks", "lab:contamination:read"),
    ("GET", "/v1/airlock/admin/contamination/registrations", "lab:contamination:read"),
    ("GET", "/v1/airlock/admin/evaluators", "lab:evaluators:read"),
    ("GET", "/v1/airlock/admin/grants", "lab:grants:read"),
    ("GET", "/v1/airlock/admin/grants/{grant_id}", "lab:grants:read"),
    ("GET", "/v1/airlock/admin/models", "lab:registry:read"),
    ("GET", "/v1/airlock/admin/redteam/findings", "lab:redteam:read"),
    ("GET", "/v1/airlock/admin/redteam/findings/{finding_id}/session", "lab:redteam:read"),
    ("GET", "/v1/airlock/admin/reports", "lab:reports:read"),
    ("GET", "/v1/airlock/admin/reports/{report_id}", "lab:reports:read"),
    ("GET", "/v1/airlock/admin/results", "lab:results:read"),
    ("GET", "/v1/airlock/admin/results/elicitation", "lab:results:read"),
    ("GET", "/v1/airlock/admin/sealed", "lab:sealed:read"),
    ("GET", "/v1/airlock/admin/sealed/{item_id}", "lab:sealed:read"),
    ("GET", "/v1/airlock/admin/sealed/{item_id}/content", "lab:sealed:read"),
    ("GET", "/v1/airlock/contamination/registrations", "evaluator"),
    ("GET", "/v1/airlock/contamination/registrations/{registration_id}", "evaluator"),
    ("GET", "/v1/airlock/gate/decisions/{decision_id}", "lab:gate:read"),
    ("GET", "/v1/airlock/gate/models/{model}/trend", "lab:gate:read"),
    ("GET", "/v1/airlock/gate/models/{model}/versions/{label}", "lab:gate:read"),
    ("GET", "/v1/airlock/gate/models/{model}/versions/{label}/history", "lab:gate:read"),
    ("GET", "/v1/airlock/gate/policy", "lab:gate:read"),
    ("GET", "/v1/airlock/grant", "evaluator"),
    ("GET", "/v1/airlock/grant/terms", "evaluator"),
    ("GET", "/v1/airlock/interp/jobs", "evaluator"),
    ("GET", "/v1/airlock/interp/jobs/{job_id}", "evaluator"),
    ("GET", "/v1/airlock/interp/jobs/{job_id}/events", "evaluator"),
    ("GET", "/v1/airlock/interp/jobs/{job_id}/result", "evaluator"),
    ("GET", "/v1/airlock/interp/jobs/{job_id}/result.npz", "evaluator"),
    ("GET", "/v1/airlock/interp/review", "lab:interp-review:read"),
    ("GET", "/v1/airlock/interp/review/{job_id}", "lab:interp-review:read"),
    ("GET", "/v1/airlock/models/{model_id:path}", "evaluator"),
    ("GET", "/v1/airlock/noise/jobs", "evaluator"),
    ("GET", "/v1/airlock/noise/jobs/{job_id}", "evaluator"),
    ("GET", "/v1/airlock/redteam/findings", "evaluator"),
    ("GET", "/v1/airlock/redteam/hours", "evaluator"),
    ("GET", "/v1/airlock/redteam/sessions", "evaluator"),
    ("GET", "/v1/airlock/redteam/sessions/{session_id}", "evaluator"),
    ("GET", "/v1/airlock/reports", "evaluator"),
    ("GET", "/v1/airlock/reports/{report_id}", "evaluator"),
    ("GET", "/v1/airlock/results", "evaluator"),
    ("GET", "/v1/airlock/results/elicitation", "evaluator"),
    ("GET", "/v1/airlock/sealed", "evaluator"),
    ("GET", "/v1/airlock/sealed/{item_id}", "evaluator"),
    ("GET", "/v1/airlock/sealed/{item_id}/ciphertext", "evaluator"),
    ("GET", "/v1/files", "evaluator"),
    ("GET", "/v1/files/{file_id}", "evaluator"),
    ("GET", "/v1/files/{file_id}/content", "evaluator"),
    ("GET", "/v1/fine_tuning/jobs", "evaluator"),
    ("GET", "/v1/fine_tuning/jobs/{job_id}", "evaluator"),
    ("GET", "/v1/fine_tuning/jobs/{job_id}/checkpoints", "evaluator"),
    ("GET", "/v1/fine_tuning/jobs/{job_id}/events", "evaluator"),
    ("GET", "/v1/fine_tuning/jobs/{job_id}/{artifact}", "evaluator"),
    ("GET", "/v1/models", "evaluator"),
    ("GET", "/v1/models/{model_id:path}", "evaluator"),
    ("HEAD", "/openapi.json", "public"),
    ("PATCH", "/v1/airlock/reports/{report_id}", "evaluator"),
    ("POST", "/detokenize", "evaluator"),
    ("POST", "/tokenize", "evaluator"),
    ("POST", "/ui/lab/findings/{finding_id}/triage", "console"),
    ("POST", "/ui/lab/grants", "console"),
    ("POST", "/ui/lab/grants/{grant_id}/keys", "console"),
    ("POST", "/ui/lab/grants/{grant_id}/revoke", "console"),
    ("POST", "/ui/lab/keys/{key_id}/revoke", "console"),
    ("POST", "/ui/lab/review/interp/{job_id}", "console"),
    ("POST", "/ui/lab/review/reports/{report_id}/agree-release", "console"),
    ("POST", "/ui/redteam/sessions", "console"),
    ("POST", "/ui/redteam/sessions/{session_id}/close", "console"),
    ("POST", "/ui/redteam/sessions/{session_id}/findings", "console"),
    ("POST", "/ui/redteam/sessions/{session_id}/turns", "console"),
    ("POST", "/ui/sign-in", "public"),
    ("POST", "/ui/sign-out", "console"),
    ("POST", "/ui/work/reports/{report_id}/{action}", "console"),
    ("POST", "/v1/airlock/admin/contamination/checks", "lab:contamination:check"),
    ("POST", "/v1/airlock/admin/contamination/checks/{check_id}/result", "lab:contamination:check"),
    ("POST", "/v1/airlock/admin/evaluators", "lab:evaluators:manage"),
    ("POST", "/v1/airlock/admin/grants", "lab:grants:issue"),
    ("POST", "/v1/airlock/admin/grants/{grant_id}/keys", "lab:keys:issue"),
    ("POST", "/v1/airlock/admin/grants/{grant_id}/revoke", "lab:access:revoke"),
    ("POST", "/v1/airlock/admin/keys/{key_id}/revoke", "lab:access:revoke"),
    ("POST", "/v1/airlock/admin/ledger/checkpoint", "lab:ledger:checkpoint"),
    ("POST", "/v1/airlock/admin/manifest", "lab:registry:manage"),
    ("POST", "/v1/airlock/admin/models/{model}/versions/{label}/stage", "lab:stage:change"),
    ("POST", "/v1/airlock/admin/redteam/findings/{finding_id}/triage", "lab:redteam:triage"),
    ("POST", "/v1/airlock/admin/reports/{report_id}/agree-release", "lab:reports:review"),
    ("POST", "/v1/airlock/admin/reports/{report_id}/comments", "lab:reports:review"),
    ("POST", "/v1/airlock/admin/reports/{report_id}/extend", "lab:stage:change"),
    ("POST", "/v1/airlock/contamination/registrations", "evaluator"),
    ("POST", "/v1/airlock/contamination/registrations/{registration_id}/withdraw", "evaluator"),
    ("POST", "/v1/airlock/gate/models/{model}/versions/{label}/promote", "lab:stage:change"),
    ("POST", "/v1/airlock/grant/accept", "evaluator"),
    ("POST", "/v1/airlock/interp/jobs", "evaluator"),
    ("POST", "/v1/airlock/interp/jobs/{job_id}/cancel", "evaluator"),
    ("POST", "/v1/airlock/interp/review/{job_id}", "lab:interp-review:decide"),
    ("POST", "/v1/airlock/noise/jobs", "evaluator"),
    ("POST", "/v1/airlock/redteam/sessions", "evaluator"),
    ("POST", "/v1/airlock/redteam/sessions/{session_id}/close", "evaluator"),
    ("POST", "/v1/airlock/redteam/sessions/{session_id}/findings", "evaluator"),
    ("POST", "/v1/airlock/redteam/sessions/{session_id}/turns", "evaluator"),
    ("POST", "/v1/airlock/reports", "evaluator"),
    ("POST", "/v1/airlock/reports/attachments", "evaluator"),
    ("POST", "/v1/airlock/reports/{report_id}/request-release", "evaluator"),
    ("POST", "/v1/airlock/reports/{report_id}/reveal", "evaluator"),
    ("POST", "/v1/airlock/reports/{report_id}/submit", "evaluator"),
    ("POST", "/v1/airlock/results", "evaluator"),
    ("POST", "/v1/airlock/sealed/{item_id}/release", "evaluator"),
    ("POST", "/v1/airlock/signing-keys", "evaluator"),
    ("POST", "/v1/chat/completions", "evaluator"),
    ("POST", "/v1/completions", "evaluator"),
    ("POST", "/v1/files", "evaluator"),
    ("POST", "/v1/fine_tuning/jobs", "evaluator"),
    ("POST", "/v1/fine_tuning/jobs/{job_id}/cancel", "evaluator"),
    ("POST", "/v1/responses", "evaluator"),
]
