"""The OpenAPI document: each route's real error responses and credentials, derived in one place.

FastAPI documents a route's success and a 422 that Airlock never sends (validation errors are
400s). This module rewrites every operation from its route's metadata:

* a dependency on the evaluator key or a lab token: 401 and 403, and the matching security scheme;
* path parameters: 404; query parameters or a body: 400; a body: 413 (the size limit);
* what a route's logic can answer besides (409 conflicts, 429 quotas, 502/503 from a model
  backend, 400/404 for values the signature cannot show): the explicit `ROUTE_RESPONSES` table.

Every error response shares one schema component, ``ErrorResponse`` (OpenAI's error shape).
The schemathesis conformance test fails when a route answers a status this document omits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.routing import iter_route_contexts

from airlock.web.errors import ErrorResponse

ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
EVALUATOR_SCHEME = "evaluatorKey"
LAB_SCHEME = "labToken"

_DESCRIPTIONS = {
    400: "Invalid request: malformed JSON, or a value the schema or the server refuses (`error.param` names it).",
    401: "Missing, unknown or revoked credential.",
    403: "The credential's grant, scopes or role do not allow this.",
    404: "No such object, or none the caller may see.",
    409: "The object's state forbids this (already exists, already finished, awaiting review, ...).",
    413: "The request body is over the size limit.",
    429: "A quota or rate limit is exhausted; `Retry-After` says when to retry, where known.",
    502: "The model's upstream server failed.",
    503: "The model backend is unavailable.",
}

_SERVING = frozenset({404, 429, 502, 503})
_LISTING = frozenset({404})  # an unknown `after` cursor
_JOB_CANCEL = frozenset({409})

#: Statuses a route can answer that its signature does not show, by (method, path as documented).
ROUTE_RESPONSES: dict[tuple[str, str], frozenset[int]] = {
    # the scrape endpoint checks its own token (or a lab token) inside its dependency
    ("GET", "/metrics"): frozenset({401, 403}),
    # the OpenAI surface
    ("POST", "/v1/chat/completions"): _SERVING,
    ("POST", "/v1/completions"): _SERVING,
    ("POST", "/v1/responses"): _SERVING,
    ("GET", "/v1/airlock/models/{model_id}"): frozenset({400}),
    ("POST", "/v1/files"): frozenset({429}),
    ("GET", "/v1/files"): _LISTING,
    ("DELETE", "/v1/files/{file_id}"): frozenset({409}),
    ("POST", "/v1/fine_tuning/jobs"): frozenset({404, 409, 429}),
    ("GET", "/v1/fine_tuning/jobs"): _LISTING,
    ("POST", "/v1/airlock/noise/jobs"): frozenset({404}),  # an unknown model, version or variant
    ("POST", "/v1/fine_tuning/jobs/{job_id}/cancel"): _JOB_CANCEL,
    # evaluator results and reports
    ("POST", "/v1/airlock/signing-keys"): frozenset({409}),
    ("POST", "/v1/airlock/grant/accept"): frozenset({409}),  # the terms changed since they were read
    ("POST", "/v1/airlock/results"): frozenset({404, 409}),
    ("GET", "/v1/airlock/results/elicitation"): frozenset({404}),  # an unknown model or version
    ("POST", "/v1/airlock/reports"): frozenset({404, 409}),
    ("PATCH", "/v1/airlock/reports/{report_id}"): frozenset({409}),
    ("POST", "/v1/airlock/reports/{report_id}/submit"): frozenset({409}),
    ("POST", "/v1/airlock/reports/{report_id}/request-release"): frozenset({409}),
    ("POST", "/v1/airlock/reports/{report_id}/reveal"): frozenset({409}),
    # remote interpretability
    ("POST", "/v1/airlock/interp/jobs"): frozenset({404, 409, 429}),
    ("GET", "/v1/airlock/interp/jobs"): _LISTING,
    ("POST", "/v1/airlock/interp/jobs/{job_id}/cancel"): _JOB_CANCEL,
    ("GET", "/v1/airlock/interp/jobs/{job_id}/result"): frozenset({409}),
    ("GET", "/v1/airlock/interp/jobs/{job_id}/result.npz"): frozenset({409}),
    ("GET", "/v1/airlock/interp/review/{job_id}"): frozenset({409}),
    ("POST", "/v1/airlock/interp/review/{job_id}"): frozenset({409}),
    # the contamination firewall
    ("POST", "/v1/airlock/contamination/registrations/{registration_id}/withdraw"): frozenset({409}),
    ("POST", "/v1/airlock/admin/contamination/checks/{check_id}/result"): frozenset({409}),
    # sealed items: already released, not yet released, ciphertext missing from the store
    ("GET", "/v1/airlock/sealed/{item_id}/ciphertext"): frozenset({409}),
    ("POST", "/v1/airlock/sealed/{item_id}/release"): frozenset({409}),
    ("GET", "/v1/airlock/admin/sealed/{item_id}/content"): frozenset({409}),
    # the lab's administration
    ("POST", "/v1/airlock/admin/manifest"): frozenset({409}),
    ("POST", "/v1/airlock/admin/evaluators"): frozenset({409}),
    ("GET", "/v1/airlock/admin/grants"): frozenset({404}),  # an unknown evaluator
    ("GET", "/v1/airlock/admin/results/elicitation"): frozenset({404}),  # an unknown model or version
    ("POST", "/v1/airlock/admin/grants"): frozenset({404}),
    ("POST", "/v1/airlock/admin/grants/{grant_id}/revoke"): frozenset({409}),
    ("POST", "/v1/airlock/admin/grants/{grant_id}/keys"): frozenset({409}),
    ("POST", "/v1/airlock/admin/keys/{key_id}/revoke"): frozenset({409}),
    ("POST", "/v1/airlock/admin/models/{model}/versions/{label}/stage"): frozenset({409}),
    ("POST", "/v1/airlock/admin/reports/{report_id}/comments"): frozenset({409}),
    ("POST", "/v1/airlock/admin/reports/{report_id}/agree-release"): frozenset({409}),
    # published, or the deadline passed, or no valid policy
    ("POST", "/v1/airlock/admin/reports/{report_id}/extend"): frozenset({409}),
    # the public record
    ("GET", "/public/ledger/checkpoint"): frozenset({404}),  # none signed yet
    # the gate (409 while no valid policy is installed)
    ("GET", "/v1/airlock/gate/policy"): frozenset({409}),
    ("GET", "/v1/airlock/gate/models/{model}/versions/{label}"): frozenset({409}),
    ("POST", "/v1/airlock/gate/models/{model}/versions/{label}/promote"): frozenset({409}),
    ("GET", "/v1/airlock/gate/models/{model}/trend"): frozenset({409}),
}


def _calls(dependant: Dependant) -> Iterator[Any]:
    for dep in dependant.dependencies:
        yield dep.call
        yield from _calls(dep)


def _error_response(status: int) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": _DESCRIPTIONS[status],
        "content": {"application/json": {"schema": ERROR_REF}},
    }
    if status == 429:
        response["headers"] = {
            "Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}
        }
    return response


Credentials = Mapping[str, Callable[..., Any]]
"""Security scheme name -> the dependency that authenticates it (the app names them; the kit knows none)."""


def route_errors(dependant: Dependant, method: str, path: str, credentials: Credentials) -> tuple[set[int], list[str]]:
    """Return the error statuses a route can answer and the security schemes it accepts."""
    calls = set(_calls(dependant))
    schemes = [name for name, call in credentials.items() if call in calls]
    statuses: set[int] = {401, 403} if schemes else set()
    if dependant.path_params:
        statuses.add(404)
    if dependant.query_params or dependant.body_params:
        statuses.add(400)
    if dependant.body_params:
        statuses.add(413)
    statuses |= ROUTE_RESPONSES.get((method, path), frozenset())
    return statuses, schemes


def document_errors(app: FastAPI, schema: dict[str, Any], credentials: Credentials) -> None:
    """Rewrite ``schema``'s operations in place: real error responses, security, no phantom 422."""
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    error_schema = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(error_schema.pop("$defs", {}))
    schemas["ErrorResponse"] = error_schema
    components["securitySchemes"] = {
        EVALUATOR_SCHEME: {"type": "http", "scheme": "bearer", "description": "An evaluator API key (`ak_…`)."},
        LAB_SCHEME: {"type": "http", "scheme": "bearer", "description": "A lab token (`at_…`) of a role."},
    }
    for route in iter_route_contexts(app.routes):
        if not getattr(route, "include_in_schema", False) or not route.methods:
            continue
        dependant = getattr(route, "dependant", None)
        path = route.path_format
        if dependant is None or path is None or path not in schema["paths"]:
            continue
        for method in route.methods:
            operation = schema["paths"][path].get(method.lower())
            if operation is None:
                continue
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            statuses, schemes = route_errors(dependant, method, path, credentials)
            for status in sorted(statuses):
                responses.setdefault(str(status), _error_response(status))
            if schemes:
                operation["security"] = [{name: []} for name in schemes]
    # FastAPI's validation-error schemas are referenced by nothing once the 422s are gone.
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)


def install_openapi(app: FastAPI, credentials: Credentials) -> None:
    """Make ``app.openapi()`` return the rewritten document (built once per set of routes).

    ``credentials`` maps ``evaluatorKey`` and ``labToken`` to the dependencies that check them.
    """
    generate = FastAPI.openapi
    documented: list[dict[str, Any]] = []

    def openapi() -> dict[str, Any]:
        schema = generate(app)  # FastAPI caches it until the routes change
        if not documented or documented[0] is not schema:
            document_errors(app, schema, credentials)
            documented[:] = [schema]
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
