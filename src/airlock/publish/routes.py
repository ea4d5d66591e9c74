"""HTTP routes of reports: evaluator drafting, lab review, and the public pages (no auth)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, File, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, PlainTextResponse, Response

from airlock.access.roles import Permission
from airlock.access.service import AdminPrincipal
from airlock.businessdays import load_calendar
from airlock.db import utcnow
from airlock.deps import (
    AuditDep,
    CurrentPrincipal,
    SessionDep,
    StateDep,
    require,
    require_independent_review,
)
from airlock.errors import ConflictError
from airlock.governance.service import policy_for_request
from airlock.publish import pages, schemas, service
from airlock.publish.schemas import (
    AttachmentPublic,
    CommentCreate,
    CommentPublic,
    ExtensionCreate,
    ExtensionPublic,
    PublicReportItem,
    ReportCreate,
    ReportLabView,
    ReportPrivate,
    ReportPublicView,
    ReportSummary,
    ReportUpdate,
    RevealRequest,
)
from airlock.web.uploads import read_upload

router = APIRouter()
evaluator_router = APIRouter(prefix="/v1/airlock/reports", tags=["evaluator: reports"])
lab_router = APIRouter(prefix="/v1/airlock/admin/reports", tags=["admin: reports"])
public_router = APIRouter(prefix="/public/reports", tags=["public: reports"])
ReportReader = Annotated[AdminPrincipal, require(Permission.REPORTS_READ)]
ReportReviewer = Annotated[AdminPrincipal, require(Permission.REPORTS_REVIEW)]
# Extending a publication clock is a deployment-side decision: the roles that may change stages,
# narrowed by the service to the policy's decider role (as for a gate override).
ClockExtender = Annotated[AdminPrincipal, require(Permission.STAGE_CHANGE)]


def publication_clock(policy_path: Path) -> service.PublicationClock:
    """Return the publication clock the policy sets (30 EU business days without a policy)."""
    policy = policy_for_request(policy_path)
    if policy is None:
        return service.DEFAULT_CLOCK
    rule = policy.publication
    try:
        calendar = load_calendar(rule.calendar)
    except ValueError as exc:
        raise ConflictError(f"the publication clock is unavailable: {exc}", code="publication_unavailable") from None
    return service.PublicationClock(
        business_days=rule.max_business_days,
        calendar=calendar,
        max_extension_days=rule.max_extension_business_days,
        decides=policy.roles.decides,
    )


# ---------------------------------------------------------------- evaluator


@evaluator_router.post("/attachments", response_model=AttachmentPublic, status_code=201)
async def upload_plot(
    state: StateDep,
    principal: CurrentPrincipal,
    audit: AuditDep,
    file: Annotated[UploadFile, File(description="A PNG plot.")],
) -> AttachmentPublic:
    """Upload a PNG plot to cite in a report's ``attachment_ids``."""
    data = await read_upload(file, service.MAX_PLOT_BYTES, what="plot")

    def store() -> AttachmentPublic:
        with state.db.session() as session:
            return AttachmentPublic.of(service.store_attachment(session, principal, file.filename or "", data))

    obj = await run_in_threadpool(store)
    audit.detail["attachment_id"] = obj.id
    return obj


@evaluator_router.post("", response_model=ReportPrivate, status_code=201)
def create_report(
    body: ReportCreate, session: SessionDep, principal: CurrentPrincipal, audit: AuditDep
) -> ReportPrivate:
    """Start a report (revision 1) about a model version of your grant."""
    content = service.DraftContent(body.title, body.body, body.result_ids, body.attachment_ids)
    report = service.create_report(session, principal, body.model, content)
    audit.detail["report_id"] = report.id
    return schemas.private_view(session, report)


@evaluator_router.get("", response_model=list[ReportSummary])
def list_reports(session: SessionDep, principal: CurrentPrincipal) -> list[ReportSummary]:
    """List your organisation's reports, newest first."""
    return [schemas.summary(session, r) for r in service.list_own_reports(session, principal)]


@evaluator_router.get("/{report_id}", response_model=ReportPrivate)
def get_report(report_id: str, session: SessionDep, principal: CurrentPrincipal) -> ReportPrivate:
    """Show one of your reports with its source, salts, revisions and lab comments."""
    return schemas.private_view(session, service.own_report(session, principal, report_id))


@evaluator_router.patch("/{report_id}", response_model=ReportPrivate)
def update_report(
    report_id: str, body: ReportUpdate, session: SessionDep, principal: CurrentPrincipal, audit: AuditDep
) -> ReportPrivate:
    """Make a new revision; a submitted report returns to draft and needs submitting again."""
    audit.detail["report_id"] = report_id
    content = service.DraftContent(body.title, body.body, body.result_ids, body.attachment_ids)
    return schemas.private_view(session, service.update_report(session, principal, report_id, content))


@evaluator_router.post("/{report_id}/submit", response_model=ReportPrivate)
def submit_report(
    report_id: str, state: StateDep, session: SessionDep, principal: CurrentPrincipal, audit: AuditDep
) -> ReportPrivate:
    """Freeze the current revision for the lab's review; the embargo or the publication clock publishes it."""
    audit.detail["report_id"] = report_id
    clock = publication_clock(state.settings.policy_path)
    return schemas.private_view(session, service.submit_report(session, principal, report_id, clock=clock))


@evaluator_router.post("/{report_id}/request-release", response_model=ReportPrivate)
def request_release(report_id: str, session: SessionDep, principal: CurrentPrincipal, audit: AuditDep) -> ReportPrivate:
    """Ask for release before the embargo ends; it is published once the lab agrees too."""
    audit.detail["report_id"] = report_id
    return schemas.private_view(session, service.request_release(session, principal, report_id))


@evaluator_router.post("/{report_id}/reveal", response_model=ReportPrivate)
def reveal(
    report_id: str, body: RevealRequest, session: SessionDep, principal: CurrentPrincipal, audit: AuditDep
) -> ReportPrivate:
    """Reveal a redacted span of a published report (text and salt become public)."""
    audit.detail["report_id"] = report_id
    return schemas.private_view(session, service.reveal(session, principal, report_id, body.redaction))


# ---------------------------------------------------------------- lab


@lab_router.get("", response_model=list[ReportSummary])
def lab_list(session: SessionDep, admin: ReportReader, status: str | None = None) -> list[ReportSummary]:
    """List reports submitted for review (and published ones)."""
    return [schemas.summary(session, r, lab=True) for r in service.list_lab_reports(session, status)]


@lab_router.get("/{report_id}", response_model=ReportLabView)
def lab_get(report_id: str, session: SessionDep, admin: ReportReader) -> ReportLabView:
    """Show a submitted report as submitted (redacted spans stay hidden from the lab too)."""
    return schemas.lab_view(session, service.lab_report(session, report_id))


@lab_router.post("/{report_id}/comments", response_model=CommentPublic, status_code=201)
def lab_comment(
    report_id: str, body: CommentCreate, session: SessionDep, admin: ReportReviewer, audit: AuditDep
) -> CommentPublic:
    """Add a lab comment; it is shown beside the report, never inside the evaluator's text."""
    audit.detail["report_id"] = report_id
    return CommentPublic.of(service.add_comment(session, report_id, admin.name, admin.role, body.body))


@lab_router.post("/{report_id}/agree-release", response_model=ReportLabView)
def lab_agree(report_id: str, session: SessionDep, admin: ReportReviewer, audit: AuditDep) -> ReportLabView:
    """Agree to release the submitted revision early (not by the token that issued the report's grant)."""
    audit.detail["report_id"] = report_id
    grant_id = service.lab_report(session, report_id).grant_id
    require_independent_review(session, admin, audit, grant_id, f"report {report_id}")
    report = service.agree_release(session, report_id, f"admin:{admin.name}")
    return schemas.lab_view(session, report)


@lab_router.post("/{report_id}/extend", response_model=ExtensionPublic, status_code=201)
def lab_extend(
    report_id: str,
    body: ExtensionCreate,
    state: StateDep,
    session: SessionDep,
    admin: ClockExtender,
    audit: AuditDep,
) -> ExtensionPublic:
    """Extend a submitted report's publication clock in exceptional circumstances (decider; public)."""
    audit.detail["report_id"] = report_id
    row = service.extend_publication(
        session,
        report_id,
        business_days=body.business_days,
        justification=body.justification,
        decider=admin.name,
        role=admin.role,
        token_id=admin.token_id,
        clock=publication_clock(state.settings.policy_path),
    )
    return ExtensionPublic.of(row)


# ---------------------------------------------------------------- public


@public_router.get("", response_model=list[PublicReportItem])
def public_list(session: SessionDep) -> list[PublicReportItem]:
    """List published reports, newest first."""
    return [schemas.public_item(session, r) for r in service.list_public_reports(session)]


def _public(session: SessionDep, report_id: str) -> ReportPublicView:
    report = service.public_report(session, report_id, utcnow())
    return schemas.public_view(session, report, service.ledger_index(session, report.id))


# Declared before "/{report_id}" so the ".md" / ".html" suffixes are not taken as part of an id.
@public_router.get("/{report_id}.md", response_class=PlainTextResponse)
def public_markdown(report_id: str, session: SessionDep) -> PlainTextResponse:
    """Return the published report as Markdown, revealed spans filled in."""
    text = schemas.public_markdown(_public(session, report_id))
    return PlainTextResponse(text, media_type="text/markdown; charset=utf-8")


@public_router.get("/{report_id}.html", response_class=HTMLResponse)
def public_html(report_id: str, session: SessionDep) -> HTMLResponse:
    """Return the published report as a self-contained HTML page."""
    page = pages.render_page(_public(session, report_id))
    return HTMLResponse(page, headers={"Content-Security-Policy": pages.CONTENT_SECURITY_POLICY})


@public_router.get("/{report_id}", response_model=ReportPublicView)
def public_get(report_id: str, session: SessionDep) -> ReportPublicView:
    """Return a published report with commitments, attested results, lab comments and content hash."""
    return _public(session, report_id)


@public_router.get("/{report_id}/attachments/{attachment_id}")
def public_attachment(report_id: str, attachment_id: str, session: SessionDep) -> Response:
    """Return the bytes of a plot of a published report."""
    data = service.published_attachment(session, report_id, attachment_id)
    return Response(data, media_type="image/png", headers={"X-Content-Type-Options": "nosniff"})


router.include_router(evaluator_router)
router.include_router(lab_router)
router.include_router(public_router)
