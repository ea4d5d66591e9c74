"""The console's pages under ``/ui`` and the offline API docs; every action goes through the API's own services.

Pages are Jinja2 templates with autoescaping (model output and every user-supplied text render as
text); forms post back with the session's CSRF token; a little JavaScript (``static/console.js``)
streams red-teaming answers and is not needed for anything else.
"""

from __future__ import annotations

import json
import secrets
from collections import Counter
from collections.abc import AsyncIterator
from operator import attrgetter
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, PackageLoader, select_autoescape
from sqlalchemy import select

from airlock import __version__
from airlock.access import audit as audit_trail
from airlock.access.middleware import AuditContext
from airlock.access.models import Grant
from airlock.access.quotas import SamplingTerms
from airlock.access.roles import Permission, check_independent_review
from airlock.access.service import (
    GrantRequest,
    create_api_key,
    create_evaluator,
    create_grant,
    get_evaluator,
    grant_status,
    list_grants,
    revoke_api_key,
    revoke_grant,
)
from airlock.access.terms import terms_of
from airlock.console import auth
from airlock.console.auth import ConsoleUser
from airlock.deps import AuditDep, StateDep, get_audit, get_state
from airlock.errors import AirlockError, NotFoundError, PermissionDeniedError
from airlock.evals import service as evals
from airlock.finetune.jobs import KIND as FINE_TUNE
from airlock.governance.service import evaluate_gate, policy_for_request
from airlock.interp import service as interp
from airlock.jobs import service as jobs
from airlock.jobs.models import TERMINAL_STATUSES, Job
from airlock.ledger import NoteError, access_table
from airlock.ledger import service as ledger
from airlock.ledger.cosign import cosigned_by, endpoints_of
from airlock.publish import service as publish
from airlock.publish.routes import publication_clock
from airlock.redteam import service as redteam
from airlock.redteam.routes import turn_events
from airlock.redteam.schemas import TurnCreate
from airlock.registry.models import Model, ModelVersion

STATIC = Path(__file__).parent / "static"
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
# Swagger UI and ReDoc set inline styles; their scripts still come only from this origin.
DOCS_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; worker-src 'self' blob:; font-src 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SIGN_IN_CSRF = "airlock_console_signin"

router = APIRouter(prefix="/ui", include_in_schema=False)
docs_router = APIRouter(include_in_schema=False)
templates = Environment(
    loader=PackageLoader("airlock.console", "templates"), autoescape=select_autoescape(default=True)
)


class SignInRequired(Exception):
    """Raised by a page that needs a signed-in user of some kind; answered with a redirect to the sign-in page."""


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


def _headers(csp: str = CSP) -> dict[str, str]:
    return {
        "Content-Security-Policy": csp,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-store",
    }


def render(name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    """Render a template with the console's security headers."""
    html = templates.get_template(name).render(version=__version__, **context)
    return HTMLResponse(html, status_code=status_code, headers=_headers())


def console_user(
    request: Request,
    state: Annotated[Any, Depends(get_state)],
    audit: Annotated[AuditContext, Depends(get_audit)],
) -> ConsoleUser | None:
    """Return the signed-in user of this request's cookie (None when signed out), noted in the audit trail."""
    with state.db.session() as session:
        user = auth.current_user(session, request.cookies.get(auth.COOKIE))
    if user is not None:
        audit.actor_type = "evaluator" if user.evaluator else "admin"
        audit.actor = user.evaluator.evaluator_name if user.evaluator else user.lab.name if user.lab else None
        if user.evaluator is not None:
            audit.evaluator_id, audit.grant_id = user.evaluator.evaluator_id, user.evaluator.grant_id
            audit.key_id = user.evaluator.key_id
        audit.detail["console_session"] = user.session_id
    return user


UserDep = Annotated[ConsoleUser | None, Depends(console_user)]


def _evaluator(user: ConsoleUser | None) -> ConsoleUser:
    if user is None or user.evaluator is None:
        raise SignInRequired
    return user


def _lab(user: ConsoleUser | None, permission: Permission) -> ConsoleUser:
    if user is None or user.lab is None:
        raise SignInRequired
    user.lab.require(permission)
    return user


async def _check_csrf(request: Request, user: ConsoleUser) -> dict[str, str]:
    """Return the posted form, refusing (403) one without this session's CSRF token."""
    form = await request.form()
    fields = {k: v for k, v in form.items() if isinstance(v, str)}
    token = request.headers.get("x-csrf-token") or fields.get("csrf_token")
    if not auth.csrf_ok(user, token):
        raise PermissionDeniedError(
            "this form was sent without its security token; reload the page and try again", code="csrf_failed"
        )
    return fields


def _page_error(exc: AirlockError, user: ConsoleUser | None) -> HTMLResponse:
    return render("error.html", status_code=exc.status_code, user=user, message=exc.message)


def install(app: Any) -> None:
    """Mount the console, its assets and the offline API docs on ``app``."""
    app.mount("/ui/static", StaticFiles(directory=STATIC), name="console-static")
    app.mount("/ui/docs-assets", StaticFiles(directory=_docs_assets()), name="docs-assets")
    app.include_router(router)
    app.include_router(docs_router)

    async def _to_sign_in(request: Request, exc: Exception) -> Response:
        return RedirectResponse("/ui/sign-in", status_code=303)

    app.add_exception_handler(SignInRequired, _to_sign_in)


def _docs_assets() -> Path:
    import fastapi_offline

    return Path(fastapi_offline.__file__).parent / "static"


# ---------------------------------------------------------------- sign-in


@router.get("")
@router.get("/")
def home(user: UserDep) -> Response:
    """Send each user to their pages (the public record when signed out)."""
    if user is None:
        return RedirectResponse("/ui/public", status_code=303)
    return RedirectResponse("/ui/redteam" if user.evaluator else "/ui/lab", status_code=303)


@router.get("/sign-in")
def sign_in_page(request: Request, user: UserDep) -> Response:
    """Show the sign-in form (a pre-session CSRF token is set as a cookie and echoed in the form)."""
    token = secrets.token_urlsafe(32)
    response = render("sign_in.html", user=user, csrf_token=token, message=None)
    response.set_cookie(
        SIGN_IN_CSRF, token, max_age=600, httponly=True, samesite="strict", secure=_secure(request), path="/ui"
    )
    return response


@router.post("/sign-in")
async def sign_in(request: Request, state: StateDep, audit: AuditDep) -> Response:
    """Exchange a key or token for a console session cookie."""
    form = await request.form()
    secret, token = form.get("credential"), form.get("csrf_token")
    expected = request.cookies.get(SIGN_IN_CSRF) or ""
    if not isinstance(token, str) or not expected or not secrets.compare_digest(token, expected):
        audit.outcome = "denied"
        return render(
            "error.html",
            status_code=403,
            user=None,
            message="this form was sent without its security token; reload the sign-in page and try again",
        )

    def _open() -> tuple[str, str]:
        with state.db.session() as session:
            row, cookie = auth.sign_in(session, secret if isinstance(secret, str) else "")
            return row.kind, cookie

    try:
        kind, cookie = await run_in_threadpool(_open)
    except AirlockError as exc:
        audit.outcome, audit.error_code = "denied", exc.code
        fresh = secrets.token_urlsafe(32)
        response = render("sign_in.html", status_code=401, user=None, csrf_token=fresh, message=exc.message)
        response.set_cookie(
            SIGN_IN_CSRF, fresh, max_age=600, httponly=True, samesite="strict", secure=_secure(request), path="/ui"
        )
        return response
    redirect = RedirectResponse("/ui/redteam" if kind == "evaluator" else "/ui/lab", status_code=303)
    redirect.set_cookie(
        auth.COOKIE,
        cookie,
        max_age=int(auth.IDLE_TIMEOUT.total_seconds()),
        httponly=True,
        samesite="strict",
        secure=_secure(request),
        path="/",
    )
    redirect.delete_cookie(SIGN_IN_CSRF, path="/ui")
    return redirect


@router.post("/sign-out")
async def sign_out(request: Request, state: StateDep, user: UserDep) -> Response:
    """End the console session."""
    if user is not None:
        await _check_csrf(request, user)
        with state.db.session() as session:
            auth.sign_out(session, user.session_id)
    response = RedirectResponse("/ui/public", status_code=303)
    response.delete_cookie(auth.COOKIE, path="/")
    return response


# ---------------------------------------------------------------- red-teamer


def _granted_ids(state: Any, grant: Grant) -> list[str]:
    with state.db.session() as session:
        model = session.get(Model, grant.model_id)
        name = model.name if model else grant.model_id
        labels = [v.label for v in session.scalars(select(ModelVersion).where(ModelVersion.id.in_(grant.version_ids)))]
    return [f"{name}@{label}/{variant}" for label in sorted(labels) for variant in grant.variants]


@router.get("/redteam")
def redteam_home(state: StateDep, user: UserDep) -> Response:
    """Show the evaluator's page: their grant and quotas left, red-teaming hours, own sessions, a new session."""
    me = _evaluator(user)
    principal = me.evaluator
    assert principal is not None
    with state.db.session() as session:
        hours = redteam.hours_of(session, principal.grant, principal.key_id)
        sessions = redteam.list_own_sessions(session, principal)
        findings = redteam.own_findings(session, principal)
        # Read fresh: the usage counter moves with every request.
        grant = session.get(Grant, principal.grant.id)
        assert grant is not None
        sampling = terms_of(grant, SamplingTerms)
        my_grant = {
            "id": grant.id,
            "scopes": ", ".join(grant.scopes),
            "from": grant.not_before,
            "until": grant.not_after,
            "tokens_used": grant.tokens_used,
            "token_quota": sampling.quota_total_tokens,
            "requests_per_minute": sampling.quota_requests_per_minute,
        }
        session.expunge_all()
    return render(
        "redteam_home.html",
        user=me,
        my_grant=my_grant,
        hours=hours,
        sessions=sessions,
        findings=findings,
        model_ids=_granted_ids(state, principal.grant),
        can_redteam=redteam.SCOPE in principal.grant.scopes,
    )


@router.post("/redteam/sessions")
async def redteam_start(request: Request, state: StateDep, user: UserDep, audit: AuditDep) -> Response:
    """Open a session with one or two model ids."""
    me = _evaluator(user)
    assert me.evaluator is not None
    try:
        fields = await _check_csrf(request, me)
        targets = [fields.get("model_a", ""), fields.get("model_b", "")]
        row = await redteam.start_session(state, me.evaluator, audit, targets, fields.get("title", ""))
    except AirlockError as exc:
        return _page_error(exc, me)
    return RedirectResponse(f"/ui/redteam/sessions/{row.id}", status_code=303)


@router.get("/redteam/sessions/{session_id}")
def redteam_session(session_id: str, state: StateDep, user: UserDep) -> Response:
    """Show a session: the transcript side by side, the prompt box, a finding form on every answer."""
    me = _evaluator(user)
    principal = me.evaluator
    assert principal is not None
    try:
        with state.db.session() as session:
            row = redteam.own_session(session, principal, session_id)
            turns = redteam.transcript(session, row.id)
            hours = redteam.hours_of(session, principal.grant, principal.key_id)
            findings = redteam.own_findings(session, principal, row.id)
            session.expunge_all()
    except AirlockError as exc:
        return _page_error(exc, me)
    return render(
        "redteam_session.html",
        user=me,
        row=row,
        turns=turns,
        hours=hours,
        findings=findings,
        categories=redteam.CATEGORIES,
        severities=redteam.SEVERITIES,
    )


@router.post("/redteam/sessions/{session_id}/turns")
async def redteam_turn(session_id: str, request: Request, state: StateDep, user: UserDep, audit: AuditDep) -> Response:
    """Send a prompt: streamed as server-sent events to the page's script, or stored and redirected without it."""
    me = _evaluator(user)
    assert me.evaluator is not None
    try:
        fields = await _check_csrf(request, me)
        body = TurnCreate(content=fields.get("content", "") or " ", stream=True)
        if "text/event-stream" in request.headers.get("accept", ""):
            events = turn_events(state, me.evaluator, audit, session_id, body)
            first = await events.__anext__()

            async def _all() -> AsyncIterator[str]:
                yield first
                async for event in events:
                    yield event

            return StreamingResponse(_all(), media_type="text/event-stream", headers=_headers())
        await redteam.run_turn(state, me.evaluator, audit, session_id, body.content)
    except AirlockError as exc:
        if "text/event-stream" in request.headers.get("accept", ""):
            payload = json.dumps({"error": exc.message})
            return Response(payload, status_code=exc.status_code, media_type="application/json", headers=_headers())
        return _page_error(exc, me)
    return RedirectResponse(f"/ui/redteam/sessions/{session_id}", status_code=303)


@router.post("/redteam/sessions/{session_id}/findings")
async def redteam_flag(session_id: str, request: Request, state: StateDep, user: UserDep, audit: AuditDep) -> Response:
    """Flag one answer as a finding."""
    me = _evaluator(user)
    assert me.evaluator is not None
    try:
        fields = await _check_csrf(request, me)
        draft = redteam.FindingDraft(
            turn_index=int(fields.get("turn", "-1") or -1),
            variant=fields.get("variant") or None,
            category=fields.get("category", ""),
            severity=fields.get("severity", ""),
            title=fields.get("title", ""),
            notes=fields.get("notes", ""),
        )
        with state.db.session() as session:
            finding = redteam.flag_finding(session, me.evaluator, session_id, draft)
            audit.detail["finding_id"] = finding.id
    except ValueError:
        return _page_error(NotFoundError("that turn does not exist"), me)
    except AirlockError as exc:
        return _page_error(exc, me)
    return RedirectResponse(f"/ui/redteam/sessions/{session_id}#findings", status_code=303)


@router.post("/redteam/sessions/{session_id}/close")
async def redteam_close(session_id: str, request: Request, state: StateDep, user: UserDep) -> Response:
    """End a session (its summary goes into the ledger)."""
    me = _evaluator(user)
    assert me.evaluator is not None
    try:
        await _check_csrf(request, me)
        with state.db.session() as session:
            redteam.close_session(session, me.evaluator, session_id)
    except AirlockError as exc:
        return _page_error(exc, me)
    return RedirectResponse("/ui/redteam", status_code=303)


# ---------------------------------------------------------------- lab


def _gate_rows(session: Any, state: Any) -> list[dict[str, Any]]:

    try:
        policy = policy_for_request(state.settings.policy_path)
    except AirlockError as exc:
        return [{"model": "-", "version": "-", "decision": "unavailable", "blocking": [exc.message]}]
    rows = []
    for model in session.scalars(select(Model).order_by(Model.name)):
        for version in session.scalars(
            select(ModelVersion).where(ModelVersion.model_id == model.id).order_by(ModelVersion.created_at)
        ):
            if policy is None:
                rows.append(
                    {
                        "model": model.name,
                        "version": version.label,
                        "stage": version.stage,
                        "decision": "no policy",
                        "blocking": [],
                    }
                )
                continue
            report = evaluate_gate(session, model, version, "deployed", policy)
            rows.append(
                {
                    "model": model.name,
                    "version": version.label,
                    "stage": version.stage,
                    "decision": report["decision"],
                    "blocking": report["blocking"],
                }
            )
    return rows


AUDIT_ROWS = 50


@router.get("/lab")
def lab_home(state: StateDep, user: UserDep, status: str | None = None, audit_grant: str | None = None) -> Response:
    """Show the lab's page: grants (create, revoke), findings to triage, the gate, the audit trail, the ledger."""
    me = _lab(user, Permission.GATE_READ)
    assert me.lab is not None
    can = {p.value for p in Permission if _holds(me, p)}
    if Permission.AUDIT_READ.value in can:
        state.audit.flush()  # the newest requests, this one's predecessors included
    with state.db.session() as session:
        trail = (
            audit_trail.tail(session, AUDIT_ROWS, grant_id=audit_grant or None)
            if Permission.AUDIT_READ.value in can
            else []
        )
        grants = list_grants(session) if Permission.GRANTS_READ.value in can else []
        grant_rows = [
            {
                "id": g.id,
                "evaluator": g.evaluator.name,
                "variants": ", ".join(g.variants),
                "scopes": ", ".join(g.scopes),
                "status": grant_status(g),
                "tokens": f"{g.tokens_used} / {terms_of(g, SamplingTerms).quota_total_tokens or 'unlimited'}",
            }
            for g in grants
        ]
        findings = redteam.list_findings(session, status=status or None) if Permission.REDTEAM_READ.value in can else []
        gate = _gate_rows(session, state)
        head = ledger.tree_head(session)
        pending = ledger.pending_count(session)
        ledger_status = _ledger_status(session, state)
        models = [m.name for m in session.scalars(select(Model).order_by(Model.name))]
        session.expunge_all()
    return render(
        "lab_home.html",
        user=me,
        can=can,
        grants=grant_rows,
        findings=findings,
        gate=gate,
        ledger_size=head.size,
        ledger_pending=pending,
        ledger_status=ledger_status,
        models=models,
        status=status or "",
        trail=trail,
        audit_grant=audit_grant or "",
    )


def _holds(user: ConsoleUser, permission: Permission) -> bool:
    assert user.lab is not None
    try:
        user.lab.require(permission)
    except PermissionDeniedError:
        return False
    return True


@router.post("/lab/grants")
async def lab_grant(request: Request, state: StateDep, user: UserDep, audit: AuditDep) -> Response:
    """Issue a grant and a first key for it (the key is shown once)."""
    try:
        me = _lab(user, Permission.GRANTS_ISSUE)
        assert me.lab is not None
        me.lab.require(Permission.KEYS_ISSUE)
        fields = await _check_csrf(request, me)
        with state.db.session() as session:
            name = fields.get("evaluator", "").strip()
            try:
                get_evaluator(session, name)
            except NotFoundError:
                create_evaluator(session, name)
            grant = create_grant(
                session,
                GrantRequest(
                    evaluator=name,
                    model=fields.get("model", ""),
                    variants=[v for v in fields.get("variants", "").replace(",", " ").split()],
                    scopes=[s for s in fields.get("scopes", "").replace(",", " ").split()],
                    created_by=me.lab.name,
                    issued_by_token_id=me.lab.token_id,
                ),
            )
            _key, secret = create_api_key(session, grant.id, name=fields.get("key_name", ""))
            audit.grant_id, grant_id = grant.id, grant.id
    except AirlockError as exc:
        return _page_error(exc, user)
    return render("key_issued.html", user=me, grant_id=grant_id, secret=secret)


@router.post("/lab/grants/{grant_id}/revoke")
async def lab_revoke(grant_id: str, request: Request, state: StateDep, user: UserDep, audit: AuditDep) -> Response:
    """Revoke a grant at once: its keys stop working, their console sessions end."""
    try:
        me = _lab(user, Permission.ACCESS_REVOKE)
        assert me.lab is not None
        fields = await _check_csrf(request, me)
        reason = fields.get("reason", "").strip()[:1000] or f"revoked in the console by {me.lab.name}"
        with state.db.session() as session:
            revoke_grant(session, grant_id, reason)
        audit.grant_id = grant_id
    except AirlockError as exc:
        return _page_error(exc, user)
    return RedirectResponse("/ui/lab#grants", status_code=303)


@router.post("/lab/findings/{finding_id}/triage")
async def lab_triage(finding_id: str, request: Request, state: StateDep, user: UserDep, audit: AuditDep) -> Response:
    """Triage a finding (acknowledge, dispute with a reason, or mark fixed in a later version)."""
    try:
        me = _lab(user, Permission.REDTEAM_TRIAGE)
        assert me.lab is not None
        fields = await _check_csrf(request, me)
        with state.db.session() as session:
            finding = redteam.get_finding(session, finding_id)
            check_independent_review(session, me.lab.token_id, finding.grant_id, "findings")
            redteam.triage_finding(
                session,
                finding_id,
                redteam.Triage(fields.get("status", ""), fields.get("reason", ""), fields.get("fixed_in") or None),
                actor=me.lab.name,
                role=me.lab.role,
            )
        audit.detail["finding_id"] = finding_id
    except AirlockError as exc:
        return _page_error(exc, user)
    return RedirectResponse("/ui/lab#findings", status_code=303)


@router.get("/lab/findings/{finding_id}")
def lab_finding(finding_id: str, state: StateDep, user: UserDep) -> Response:
    """Show one finding with the transcript turn it cites."""
    try:
        me = _lab(user, Permission.REDTEAM_READ)
        with state.db.session() as session:
            finding = redteam.get_finding(session, finding_id)
            turns = redteam.transcript(session, finding.session_id)
            session.expunge_all()
    except AirlockError as exc:
        return _page_error(exc, user)
    turn = next((t for t in turns if t.index == finding.turn_index), None)
    return render(
        "lab_finding.html", user=me, finding=finding, turn=turn, can_triage=_holds(me, Permission.REDTEAM_TRIAGE)
    )


# ---------------------------------------------------------------- evaluator: jobs, results, reports

REFRESH_S = 10


def _job_row(session: Any, job: Job, status: str, what: str, model: str) -> dict[str, Any]:
    # The newest event says where a running job stands ("step 40/100", "job queued", ...).
    newest, _ = jobs.list_events(session, job.id, limit=1, newest_first=True)
    return {
        "id": job.id,
        "kind": what,
        "model": model,
        "status": status,
        "progress": round(100 * float(job.progress or 0.0)),
        "last_event": newest[0].message if newest else "",
        "created_at": job.created_at,
        "running": job.status not in TERMINAL_STATUSES,
    }


@router.get("/work")
def evaluator_work(state: StateDep, user: UserDep) -> Response:
    """Show the evaluator's fine-tuning and interp jobs, attested results and reports (their organisation's only)."""
    me = _evaluator(user)
    principal = me.evaluator
    assert principal is not None
    with state.db.session() as session:
        # The same listings (and the same ownership filters) as the API's GET routes.
        tuned, _ = jobs.list_jobs(session, principal.evaluator_id, limit=jobs.MAX_PAGE, kind=FINE_TUNE)
        job_rows = [_job_row(session, j, j.status, "fine-tuning", str(j.params.get("model", ""))) for j in tuned]
        probes, _ = interp.list_own_jobs(session, principal, after=None, limit=jobs.MAX_PAGE)
        job_rows += [_job_row(session, j, interp.public_status(j, r), "interp", r.model) for j, r in probes]
        job_rows.sort(key=lambda r: r["created_at"], reverse=True)
        results = evals.list_results(session, evaluator_id=principal.evaluator_id)
        reports = [
            {
                "id": r.id,
                "title": next((v.title for v in r.revisions if v.number == r.current_revision), ""),
                "status": r.status,
                "revision": r.current_revision,
                "publish_by": r.publish_by,
                "release_requested": r.release_requested_revision is not None
                and r.release_requested_revision == r.submitted_revision,
            }
            for r in publish.list_own_reports(session, principal)
        ]
        session.expunge_all()
    return render(
        "evaluator_work.html",
        user=me,
        jobs=job_rows,
        results=results,
        reports=reports,
        refresh=REFRESH_S if any(r["running"] for r in job_rows) else None,
    )


@router.post("/work/reports/{report_id}/{action}")
async def evaluator_report_action(
    report_id: str, action: str, request: Request, state: StateDep, user: UserDep, audit: AuditDep
) -> Response:
    """Submit a draft report for the lab's review, or ask for its early release (the API's own service calls)."""
    me = _evaluator(user)
    assert me.evaluator is not None
    try:
        await _check_csrf(request, me)
        with state.db.session() as session:
            if action == "submit":
                clock = publication_clock(state.settings.policy_path)
                publish.submit_report(session, me.evaluator, report_id, clock=clock)
            elif action == "request-release":
                publish.request_release(session, me.evaluator, report_id)
            else:
                raise NotFoundError(f"there is no report action {action!r}")
        audit.detail["report_id"] = report_id
    except AirlockError as exc:
        return _page_error(exc, me)
    return RedirectResponse("/ui/work#reports", status_code=303)


# ---------------------------------------------------------------- lab: keys, review queue


@router.get("/lab/keys")
def lab_keys(state: StateDep, user: UserDep) -> Response:
    """Show every grant's keys (prefix, name, created, revoked), with issue and revoke forms for roles that may."""
    try:
        me = _lab(user, Permission.GRANTS_READ)
    except PermissionDeniedError as exc:
        return _page_error(exc, user)
    with state.db.session() as session:
        grants = [
            {
                "id": g.id,
                "evaluator": g.evaluator.name,
                "status": grant_status(g),
                "keys": sorted(g.keys, key=attrgetter("created_at")),
            }
            for g in list_grants(session)
        ]
        session.expunge_all()
    return render(
        "lab_keys.html",
        user=me,
        grants=grants,
        can_issue=_holds(me, Permission.KEYS_ISSUE),
        can_revoke=_holds(me, Permission.ACCESS_REVOKE),
    )


@router.post("/lab/grants/{grant_id}/keys")
async def lab_key_issue(grant_id: str, request: Request, state: StateDep, user: UserDep, audit: AuditDep) -> Response:
    """Issue another key for a grant (shown once)."""
    try:
        me = _lab(user, Permission.KEYS_ISSUE)
        fields = await _check_csrf(request, me)
        with state.db.session() as session:
            key, secret = create_api_key(session, grant_id, name=fields.get("name", "").strip()[:100])
            audit.grant_id = grant_id
            audit.detail["issued_key_id"] = key.id
    except AirlockError as exc:
        return _page_error(exc, user)
    return render("key_issued.html", user=me, grant_id=grant_id, secret=secret)


@router.post("/lab/keys/{key_id}/revoke")
async def lab_key_revoke(key_id: str, request: Request, state: StateDep, user: UserDep, audit: AuditDep) -> Response:
    """Revoke one key at once (its console sessions end with it)."""
    try:
        me = _lab(user, Permission.ACCESS_REVOKE)
        await _check_csrf(request, me)
        with state.db.session() as session:
            key = revoke_api_key(session, key_id)
            audit.grant_id = key.grant_id
            audit.detail["revoked_key_id"] = key_id
    except AirlockError as exc:
        return _page_error(exc, user)
    return RedirectResponse("/ui/lab/keys", status_code=303)


@router.get("/lab/review")
def lab_review(state: StateDep, user: UserDep) -> Response:
    """Show the review queue: held interp results (approve or deny) and submitted reports awaiting the lab."""
    me = _lab(user, Permission.GATE_READ)
    can_interp = _holds(me, Permission.INTERP_REVIEW_READ)
    can_reports = _holds(me, Permission.REPORTS_READ)
    if not (can_interp or can_reports):
        return _page_error(PermissionDeniedError("your role may not read the review queue"), me)
    with state.db.session() as session:
        held = [interp.to_review_item(j, r) for j, r in interp.list_for_review(session)] if can_interp else []
        reports = [
            {
                "id": r.id,
                "title": next((v.title for v in r.revisions if v.number == r.submitted_revision), ""),
                "evaluator": r.evaluator_id,
                "submitted_at": r.submitted_at,
                "publish_by": r.publish_by,
                "release_requested": r.release_requested_revision == r.submitted_revision,
                "agreed": r.release_agreed_revision == r.submitted_revision,
            }
            for r in (publish.list_lab_reports(session, status="submitted") if can_reports else [])
        ]
        session.expunge_all()
    return render(
        "lab_review.html",
        user=me,
        held=held,
        reports=reports,
        can_interp=can_interp,
        can_reports=can_reports,
        can_decide=_holds(me, Permission.INTERP_REVIEW_DECIDE),
        can_agree=_holds(me, Permission.REPORTS_REVIEW),
    )


@router.post("/lab/review/interp/{job_id}")
async def lab_review_decide(job_id: str, request: Request, state: StateDep, user: UserDep, audit: AuditDep) -> Response:
    """Approve or deny a held interp result (not by the token that issued its grant)."""
    try:
        me = _lab(user, Permission.INTERP_REVIEW_DECIDE)
        assert me.lab is not None
        fields = await _check_csrf(request, me)
        audit.scope = "interp_review"
        with state.db.session() as session:
            _job, held = interp.get_job_for_lab(session, job_id)
            check_independent_review(session, me.lab.token_id, held.grant_id, f"interp job {job_id}")
            decision = fields.get("decision", "")
            interp.decide(
                session,
                job_id,
                reviewer=me.lab.name,
                decision=decision,
                reason=fields.get("reason", "")[:2000],
            )
        audit.detail.update({"job_id": job_id, "decision": decision})
    except AirlockError as exc:
        return _page_error(exc, user)
    if decision == "deny":
        # Only now, the decision committed: a failed commit must leave the held result intact.
        interp.discard_result(state.settings.artifacts_dir, job_id)
    return RedirectResponse("/ui/lab/review", status_code=303)


@router.post("/lab/review/reports/{report_id}/agree-release")
async def lab_report_agree(
    report_id: str, request: Request, state: StateDep, user: UserDep, audit: AuditDep
) -> Response:
    """Agree to release a submitted report early (not by the token that issued its grant); published once both agree."""
    try:
        me = _lab(user, Permission.REPORTS_REVIEW)
        assert me.lab is not None
        await _check_csrf(request, me)
        audit.detail["report_id"] = report_id
        with state.db.session() as session:
            grant_id = publish.lab_report(session, report_id).grant_id
            check_independent_review(session, me.lab.token_id, grant_id, f"report {report_id}")
            publish.agree_release(session, report_id, f"admin:{me.lab.name}")
    except AirlockError as exc:
        return _page_error(exc, user)
    return RedirectResponse("/ui/lab/review#reports", status_code=303)


def _ledger_status(session: Any, state: Any) -> dict[str, Any]:
    checkpoint = ledger.latest_checkpoint(session)
    cosigned: list[str] = []
    try:
        endpoints = endpoints_of(state.settings)
        if checkpoint is not None:
            cosigned = cosigned_by(checkpoint.note, endpoints)
    except (NoteError, ValueError):
        # A malformed witness key or note shows as nothing cosigned, never as an error page.
        endpoints = []
    return {
        "size": checkpoint.size if checkpoint else None,
        "root": checkpoint.root_hash.hex() if checkpoint else None,
        "time": checkpoint.created_at if checkpoint else None,
        "witnesses": [e.name for e in endpoints],
        "cosigned": cosigned,
    }


# ---------------------------------------------------------------- public


def _ledger_entries(session: Any) -> list[dict[str, Any]]:
    size = ledger.tree_head(session).size
    entries: list[dict[str, Any]] = []
    for start in range(0, size, ledger.MAX_PAGE):
        entries += [json.loads(r.entry) for r in ledger.get_entries(session, start, min(size, start + ledger.MAX_PAGE))]
    return entries


def _public_tables(entries: list[dict[str, Any]], session: Any) -> list[dict[str, Any]]:
    found: dict[str, Counter[str]] = {}
    for e in entries:
        if e.get("kind") == "redteam.finding":
            found.setdefault(e["body"]["version"]["hash"], Counter())[e["body"]["severity"]] += 1
    tables = []
    for model in session.scalars(select(Model).order_by(Model.name)):
        rows = access_table(entries, model.name)
        tables.append(
            {
                "model": model.name,
                "rows": rows,
                "redteam": {r.version_hash: found.get(r.version_hash, Counter()) for r in rows},
            }
        )
    return tables


@router.get("/public")
def public_page(state: StateDep, user: UserDep) -> Response:
    """Show the public record: the checkpoint, who had which access to each version, red-team findings, reports."""
    with state.db.session() as session:
        checkpoint = ledger.latest_checkpoint(session)
        entries = _ledger_entries(session)
        tables = _public_tables(entries, session)
        reports = publish.list_public_reports(session)
        session.expunge_all()
    # Every delay of a report's publication is public, published or not yet (from the ledger alone).
    delays = [e["body"] for e in entries if e.get("kind") == "report.extended"]
    return render(
        "public.html",
        user=user,
        checkpoint=checkpoint.note if checkpoint else None,
        tables=tables,
        reports=reports,
        delays=delays,
        severities=redteam.SEVERITIES,
    )


# ---------------------------------------------------------------- offline API docs


@docs_router.get("/docs")
def swagger_ui() -> HTMLResponse:
    """Swagger UI from packaged assets (no CDN)."""
    html = templates.get_template("swagger.html").render()
    return HTMLResponse(html, headers=_headers(DOCS_CSP))


@docs_router.get("/redoc")
def redoc() -> HTMLResponse:
    """ReDoc from packaged assets (no CDN)."""
    html = templates.get_template("redoc.html").render()
    return HTMLResponse(html, headers=_headers(DOCS_CSP))
