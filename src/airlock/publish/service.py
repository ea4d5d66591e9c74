"""Report logic: drafts and immutable revisions, submission, embargo, agreement, publication, reveal.

Rules, in one place:

* A report is about one model version of the drafting key's grant; it cites only results the
  evaluator's organisation attested (signature still verifying) about that version.
* Every change is a new immutable revision whose ``content_hash`` is SHA-256 over the canonical
  JSON of its public document (see :func:`build_document`), chained to the previous revision's hash.
* ``draft → submitted`` freezes the current revision for the lab. Editing a submitted report makes
  a new draft revision and cancels release agreements (they were about other content).
* A submitted report is published when its embargo has passed, or at once when the evaluator has
  requested and the lab has agreed to early release of the same submitted revision.
* The publication clock: whatever the embargo says, a submitted report is published at the latest
  ``N`` business days after its submission (the policy's ``publication.max_business_days``, 30 by
  default, on its calendar), unless the lab's decider records an exceptional-circumstances
  extension with a justification (:func:`extend_publication`): a row here and a public
  ``report.extended`` ledger event. Each submission starts the clock again.
* Embargo: ``embargo_days`` of every grant involved (the report's and its results'), counted from
  the version's first transition to ``deployed``; the longest wins. If the version was never
  deployed, or a grant sets no embargo term, there is no date: only mutual agreement publishes.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, select, update
from sqlalchemy.orm import Session

from airlock.access.models import Evaluator, Grant
from airlock.access.seal import grant_holds
from airlock.access.service import Principal, check_window
from airlock.access.terms import terms_of
from airlock.businessdays import Calendar
from airlock.canonical import canonical_forms, sha256_hex
from airlock.db import Database, utcnow
from airlock.errors import ConflictError, InvalidRequestError, NotFoundError, PermissionDeniedError
from airlock.evals.attestation import fingerprint, parse_public_key
from airlock.evals.attestation import verify as verify_signature
from airlock.evals.models import EvalResult, SigningKey
from airlock.evals.service import verify_stored
from airlock.evals.terms import PublicationTerms
from airlock.ids import parse_version_ref
from airlock.jobs.periodic import PeriodicWorker
from airlock.ledger import models as ledger_models
from airlock.ledger import service as ledger
from airlock.publish import redaction
from airlock.publish.models import (
    Report,
    ReportAttachment,
    ReportComment,
    ReportExtension,
    ReportRedaction,
    ReportRevision,
)
from airlock.registry.models import Model, ModelVersion, StageChange
from airlock.registry.service import get_model, get_version

DOCUMENT_SCHEMA = "airlock.report/v1"
MAX_TITLE_CHARS = 300
MAX_BODY_CHARS = 200_000
MAX_RESULTS = 100
MAX_ATTACHMENTS = 20
MAX_PLOT_BYTES = 2 * 1024 * 1024
MAX_COMMENT_CHARS = 20_000
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MIN_EXTENSION_JUSTIFICATION_CHARS = 20
MAX_EXTENSION_JUSTIFICATION_CHARS = 10_000

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- embargo


@dataclass(frozen=True)
class Embargo:
    """When a submitted report may be published without agreement, and why."""

    ends_at: datetime | None
    deployed_at: datetime | None
    rule: str

    def passed(self, now: datetime) -> bool:
        """Return True when the embargo has ended at ``now`` (never when there is no date)."""
        return self.ends_at is not None and now >= self.ends_at


def deployed_at(session: Session, version: ModelVersion) -> datetime | None:
    """Return when ``version`` first became ``deployed`` (stage history first), or None."""
    first = session.scalar(
        select(StageChange.at)
        .where(StageChange.version_id == version.id, StageChange.to_stage == "deployed")
        .order_by(StageChange.at, StageChange.id)
        .limit(1)
    )
    if first is not None:
        return first
    # Versions registered before stage history existed only carry their current stage.
    return version.stage_changed_at if version.stage == "deployed" else None


def embargo_of(session: Session, report: Report) -> Embargo:
    """Compute the embargo of ``report`` from its grants' terms and its version's deployment."""
    version = session.get(ModelVersion, report.version_id)
    assert version is not None
    revision = _revision(report, report.submitted_revision or report.current_revision)
    grant_ids = {report.grant_id}
    if revision.result_ids:
        grant_ids |= set(session.scalars(select(EvalResult.grant_id).where(EvalResult.id.in_(revision.result_ids))))
    grants = list(session.scalars(select(Grant).where(Grant.id.in_(grant_ids)).order_by(Grant.id)))
    deployed = deployed_at(session, version)
    # An embargo term read from a row edited outside Airlock sets no date (the failed check is logged).
    failed = [g.id for g in grants if not grant_holds(session, g)]
    if failed:
        return Embargo(
            None, deployed, f"grant(s) {', '.join(failed)} failed their integrity check: publication needs both parties"
        )
    embargoes = {g.id: terms_of(g, PublicationTerms).embargo_days for g in grants}
    open_ended = [grant_id for grant_id, days in embargoes.items() if days is None]
    if open_ended:
        return Embargo(
            None, deployed, f"grant(s) {', '.join(open_ended)} set no embargo term: publication needs both parties"
        )
    days = max(days or 0 for days in embargoes.values())
    if deployed is None:
        return Embargo(
            None,
            None,
            f"{days}-day embargo after deployment; the version is not deployed: publication needs both parties",
        )
    return Embargo(deployed + timedelta(days=days), deployed, f"{days} day(s) after deployment")


# ---------------------------------------------------------------- publication clock


@dataclass(frozen=True)
class PublicationClock:
    """How long a submitted report may wait at most, and how much one extension may add (business days)."""

    business_days: int = 30
    calendar: Calendar = field(default_factory=Calendar)
    max_extension_days: int = 30
    # The lab role whose members may extend (the policy's ``roles.decides``).
    decides: str = "decider"

    def deadline(self, start: datetime, days: int | None = None) -> datetime:
        """Return the time ``days`` (default: the clock's) business days after ``start``."""
        return self.calendar.add_business_days(start, self.business_days if days is None else days)


DEFAULT_CLOCK = PublicationClock()


# ---------------------------------------------------------------- attachments


def store_attachment(session: Session, principal: Principal, filename: str, data: bytes) -> ReportAttachment:
    """Validate a PNG plot and store it for the caller's organisation."""
    if len(data) > MAX_PLOT_BYTES:
        raise InvalidRequestError(f"plot is over {MAX_PLOT_BYTES} bytes", code="file_too_large", param="file")
    # The signature plus the IHDR chunk header: a PNG's first chunk must be IHDR (RFC 2083 §3.2).
    if len(data) < 33 or not data.startswith(PNG_MAGIC) or data[12:16] != b"IHDR":
        raise InvalidRequestError("plots must be PNG images", code="unsupported_file_type", param="file")
    name = (filename or "plot.png").replace("/", "_").replace("\\", "_").strip()[:255] or "plot.png"
    row = ReportAttachment(
        evaluator_id=principal.evaluator_id,
        filename=name,
        media_type="image/png",
        size_bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        data=data,
    )
    session.add(row)
    session.flush()
    return row


def published_attachment(session: Session, report_id: str, attachment_id: str, now: datetime | None = None) -> bytes:
    """Return the bytes of a plot of a published report's published revision (404 otherwise)."""
    report = public_report(session, report_id, now)
    revision = _revision(report, report.published_revision or 0)
    row = session.get(ReportAttachment, attachment_id) if attachment_id in revision.attachment_ids else None
    if row is None:
        raise NotFoundError(f"report {report_id} has no attachment {attachment_id!r}")
    return row.data


# ---------------------------------------------------------------- drafting


@dataclass(frozen=True)
class DraftContent:
    """What an evaluator writes; ``None`` fields of an update keep the previous revision's value."""

    title: str | None = None
    body: str | None = None
    result_ids: Sequence[str] | None = None
    attachment_ids: Sequence[str] | None = None


def create_report(
    session: Session, principal: Principal, model: str, content: DraftContent, now: datetime | None = None
) -> Report:
    """Start a report about ``model`` (``name@version``) of the caller's grant; its first revision."""
    now = now or utcnow()
    check_window(principal.grant, now)
    if content.title is None or content.body is None:
        raise InvalidRequestError("a new report needs a title and a body")
    ref = parse_version_ref(model)
    model_row = get_model(session, ref.model)
    version = get_version(session, model_row, ref.version)
    grant = principal.grant
    if model_row.id != grant.model_id or version.id not in grant.version_ids:
        raise PermissionDeniedError(
            f"your grant does not cover {model_row.name}@{version.label}; reports are about granted versions",
            code="version_not_granted",
        )
    actor = f"key:{principal.key_id}"
    report = Report(
        evaluator_id=principal.evaluator_id,
        grant_id=principal.grant_id,
        model_id=model_row.id,
        version_id=version.id,
        status="draft",
        current_revision=0,
        created_by=actor,
        created_at=now,
        updated_at=now,
    )
    session.add(report)
    session.flush()
    _add_revision(session, report, principal, content, actor, now)
    return report


def update_report(
    session: Session, principal: Principal, report_id: str, content: DraftContent, now: datetime | None = None
) -> Report:
    """Make a new revision of an unpublished report; a submitted one goes back to draft."""
    now = now or utcnow()
    report = own_report(session, principal, report_id, now, lock=True)
    if report.status == "published":
        raise ConflictError(f"report {report.id} is published and can no longer change", code="report_published")
    if all(v is None for v in (content.title, content.body, content.result_ids, content.attachment_ids)):
        raise InvalidRequestError("nothing to change: give a title, body, result_ids or attachment_ids")
    _add_revision(session, report, principal, content, f"key:{principal.key_id}", now)
    if report.status == "submitted":
        report.status = "draft"
        # The clock runs for the submitted content; the next submission starts it again.
        report.publish_by = None
    # Agreements were about the content the lab saw; new content needs them again.
    _clear_release(report)
    return report


def submit_report(
    session: Session,
    principal: Principal,
    report_id: str,
    now: datetime | None = None,
    *,
    clock: PublicationClock = DEFAULT_CLOCK,
) -> Report:
    """Freeze the current revision for the lab's review; starts the embargo and the publication clock."""
    now = now or utcnow()
    report = own_report(session, principal, report_id, now, lock=True)
    if report.status != "draft":
        raise ConflictError(f"report {report.id} is already {report.status}", code=f"report_{report.status}")
    revision = _revision(report, report.current_revision)
    # Keys can be revoked between drafting and submitting: check the cited results again.
    _check_results(session, principal, report.version_id, revision.result_ids)
    report.status = "submitted"
    report.submitted_revision = revision.number
    report.submitted_at = now
    report.updated_at = now
    report.publish_by = clock.deadline(now)
    report.clock_business_days = clock.business_days
    report.clock_calendar = clock.calendar.name
    session.flush()
    return report


def request_release(session: Session, principal: Principal, report_id: str, now: datetime | None = None) -> Report:
    """Record the evaluator's request for early release; publishes when the lab agreed too."""
    now = now or utcnow()
    report = own_report(session, principal, report_id, now, lock=True)
    _require_submitted(report)
    if report.release_requested_revision != report.submitted_revision:
        report.release_requested_revision = report.submitted_revision
        report.release_requested_at = now
        report.release_requested_by = f"key:{principal.key_id}"
        report.updated_at = now
    _publish_if_agreed(session, report, now)
    return report


def reveal(session: Session, principal: Principal, report_id: str, number: int, now: datetime | None = None) -> Report:
    """Reveal redaction ``number`` of a published report: its text and salt become public."""
    now = now or utcnow()
    report = own_report(session, principal, report_id, now, lock=True)
    if report.status != "published" or report.published_revision is None:
        raise ConflictError(
            "only published reports have spans to reveal; edit the draft to un-redact", code="report_not_published"
        )
    revision = _revision(report, report.published_revision)
    span = next((r for r in revision.redactions if r.number == number), None)
    if span is None:
        raise NotFoundError(f"report {report.id} has no redaction #{number}", code="redaction_not_found")
    # Conditional, like publication: of two concurrent reveals only the one that changed the row
    # records the ledger event, even if the report lock were ever lost.
    result = cast(
        CursorResult[Any],
        session.execute(
            update(ReportRedaction)
            .where(ReportRedaction.id == span.id, ReportRedaction.revealed_at.is_(None))
            .values(revealed_at=now, revealed_by=f"key:{principal.key_id}")
            .execution_options(synchronize_session=False)
        ),
    )
    session.refresh(span)
    if result.rowcount != 1:
        raise ConflictError(f"redaction #{number} was already revealed", code="already_revealed")
    report.updated_at = now
    session.flush()
    ledger.record_event(
        session,
        "report.revealed",
        {
            "report_id": report.id,
            "revision": revision.number,
            "content_hash": revision.content_hash,
            "redaction": number,
            "commitment": span.commitment,
            "salt": span.salt,
            "text": span.text,
        },
    )
    return report


def own_report(
    session: Session, principal: Principal, report_id: str, now: datetime | None = None, *, lock: bool = False
) -> Report:
    """Return a report of the caller's organisation (404 for anyone else's: existence is private).

    ``lock`` serialises changes to the report for the rest of the transaction.
    """
    now = now or utcnow()
    if lock:
        _lock(session, report_id, now, evaluator_id=principal.evaluator_id)
    report = session.get(Report, report_id)
    if report is None or report.evaluator_id != principal.evaluator_id:
        raise NotFoundError(f"report {report_id!r} does not exist", code="report_not_found")
    if _lazy_publish(session, report, now) and lock:
        _relock(session, report, now)
    return report


def list_own_reports(session: Session, principal: Principal, now: datetime | None = None) -> list[Report]:
    """Return the caller's organisation's reports, newest first."""
    publish_due(session, now)
    stmt = select(Report).where(Report.evaluator_id == principal.evaluator_id).order_by(Report.created_at.desc())
    return list(session.scalars(stmt))


# ---------------------------------------------------------------- lab side


def lab_report(session: Session, report_id: str, now: datetime | None = None, *, lock: bool = False) -> Report:
    """Return a report the lab may see: one submitted at least once (404 otherwise)."""
    now = now or utcnow()
    if lock:
        _lock(session, report_id, now)
    report = session.get(Report, report_id)
    if report is None or report.submitted_revision is None:
        raise NotFoundError(f"report {report_id!r} does not exist", code="report_not_found")
    if _lazy_publish(session, report, now) and lock:
        _relock(session, report, now)
    return report


def list_lab_reports(session: Session, status: str | None = None, now: datetime | None = None) -> list[Report]:
    """Return every report submitted at least once, newest submission first."""
    publish_due(session, now)
    stmt = select(Report).where(Report.submitted_revision.is_not(None)).order_by(Report.submitted_at.desc())
    if status:
        stmt = stmt.where(Report.status == status)
    return list(session.scalars(stmt))


def add_comment(
    session: Session, report_id: str, author: str, role: str, body: str, now: datetime | None = None
) -> ReportComment:
    """Attach a lab comment to the report's submitted revision (the evaluator's text is untouched)."""
    now = now or utcnow()
    report = lab_report(session, report_id, now, lock=True)
    text = body.strip()
    if not text or len(text) > MAX_COMMENT_CHARS:
        raise InvalidRequestError(f"a comment must be 1-{MAX_COMMENT_CHARS} characters", param="body")
    assert report.submitted_revision is not None
    comment = ReportComment(
        report_id=report.id, revision=report.submitted_revision, author=author, role=role, body=text, created_at=now
    )
    report.comments.append(comment)
    session.flush()
    return comment


def agree_release(session: Session, report_id: str, actor: str, now: datetime | None = None) -> Report:
    """Record the lab's agreement to early release; publishes when the evaluator requested it too."""
    now = now or utcnow()
    report = lab_report(session, report_id, now, lock=True)
    _require_submitted(report)
    if report.release_agreed_revision != report.submitted_revision:
        report.release_agreed_revision = report.submitted_revision
        report.release_agreed_at = now
        report.release_agreed_by = actor
        report.updated_at = now
    _publish_if_agreed(session, report, now)
    return report


# ---------------------------------------------------------------- publication


def publish_if_due(session: Session, report: Report, now: datetime) -> bool:
    """Publish a submitted report whose embargo or publication clock has run out; True when this call did."""
    if report.status != "submitted":
        return False
    if embargo_of(session, report).passed(now):
        return _publish(session, report, "embargo", now)
    if report.publish_by is not None and now >= report.publish_by:
        return _publish(session, report, "deadline", now)
    return False


def extend_publication(
    session: Session,
    report_id: str,
    *,
    business_days: int,
    justification: str,
    decider: str,
    role: str,
    token_id: str | None = None,
    clock: PublicationClock = DEFAULT_CLOCK,
    now: datetime | None = None,
) -> ReportExtension:
    """Record the decider's exceptional-circumstances extension of a report's publication clock (public)."""
    now = now or utcnow()
    if role != clock.decides:
        raise PermissionDeniedError(
            f"only the policy's decider role ({clock.decides!r}) may extend a publication clock; "
            f"{decider!r} has role {role!r}",
            code="not_decider",
        )
    text = justification.strip()
    if not MIN_EXTENSION_JUSTIFICATION_CHARS <= len(text) <= MAX_EXTENSION_JUSTIFICATION_CHARS:
        raise InvalidRequestError(
            "an extension needs a public justification of the exceptional circumstances, "
            f"{MIN_EXTENSION_JUSTIFICATION_CHARS}-{MAX_EXTENSION_JUSTIFICATION_CHARS} characters",
            code="justification_required",
            param="justification",
        )
    if not 1 <= business_days <= clock.max_extension_days:
        raise InvalidRequestError(
            f"one extension adds 1-{clock.max_extension_days} business days (the policy's "
            "publication.max_extension_business_days)",
            param="business_days",
        )
    # A report whose clock has already run out is published by this read, and then cannot be extended.
    report = lab_report(session, report_id, now, lock=True)
    _require_submitted(report)
    previous = report.publish_by
    if previous is None:
        raise ConflictError(f"report {report.id} has no publication clock running", code="no_publication_clock")
    new_deadline = clock.deadline(previous, business_days)
    # Conditional like publication: an extension lands only while the deadline it extends is still
    # ahead, so it never races a publisher that found the report due (whichever writes first wins).
    result = cast(
        CursorResult[Any],
        session.execute(
            update(Report)
            .where(
                Report.id == report.id,
                Report.status == "submitted",
                Report.publish_by == previous,
                Report.publish_by > now,
            )
            .values(publish_by=new_deadline, updated_at=now)
            .execution_options(synchronize_session=False)
        ),
    )
    if result.rowcount != 1:
        raise ConflictError(f"report {report.id}'s publication clock has run out or changed", code="publication_due")
    session.refresh(report)
    assert report.submitted_revision is not None and report.submitted_at is not None
    row = ReportExtension(
        report_id=report.id,
        revision=report.submitted_revision,
        business_days=business_days,
        previous_deadline=previous,
        new_deadline=new_deadline,
        justification=text,
        decider=decider,
        role=role,
        token_id=token_id,
        created_at=now,
    )
    report.extensions.append(row)
    session.flush()
    ledger.record_event(
        session,
        "report.extended",
        {
            **_subject(session, report),
            "revision": report.submitted_revision,
            "submitted_at": report.submitted_at.isoformat(),
            "business_days": business_days,
            "calendar": clock.calendar.name,
            "previous_deadline": previous.isoformat(),
            "new_deadline": new_deadline.isoformat(),
            "justification": text,
            "decider": decider,
            "role": role,
            "extended_at": now.isoformat(),
        },
        confidential={"token_id": token_id},
    )
    return row


def publish_due(session: Session, now: datetime | None = None) -> list[str]:
    """Publish every submitted report whose embargo has passed; returns their ids."""
    now = now or utcnow()
    published = []
    due = list(session.scalars(select(Report).where(Report.status == "submitted").order_by(Report.submitted_at)))
    for report in due:
        if _lazy_publish(session, report, now):
            published.append(report.id)
    return published


class DuePublisher(PeriodicWorker):
    """Publishes reports whose embargo or publication clock has run out, from a background thread.

    Every replica may run one: publication is a conditional update, so each report is published
    (and ledgered) once whichever replica gets there first. ``clock`` tells the time (tests inject one).
    """

    name = "report-publisher"

    def __init__(self, db: Database, interval_s: float, clock: Callable[[], datetime] = utcnow) -> None:
        super().__init__(interval_s)
        self.db = db
        self.clock = clock

    def run_once(self) -> list[str]:
        """Publish what is due now; returns the report ids this pass published."""
        with self.db.session() as session:
            published = publish_due(session, self.clock())
        for report_id in published:
            log.info("published %s (embargo or publication clock ran out)", report_id)
        return published


def _lock(session: Session, report_id: str, now: datetime, *, evaluator_id: str | None = None) -> None:
    # Writing before reading serialises concurrent changes to one report: PostgreSQL row-locks it
    # and SQLite takes its write lock first, so no edit builds on a stale revision number and a
    # stale SQLite read snapshot never has to be upgraded (which fails instead of waiting).
    stmt = update(Report).where(Report.id == report_id).values(updated_at=now)
    if evaluator_id is not None:
        stmt = stmt.where(Report.evaluator_id == evaluator_id)
    session.execute(stmt.execution_options(synchronize_session=False))


def _relock(session: Session, report: Report, now: datetime) -> None:
    # A lazy publication commits, which ends the transaction and with it the lock: take it again
    # and reload, so the caller's change is still serialised against concurrent ones.
    _lock(session, report.id, now)
    session.expire_all()
    session.refresh(report)


def _lazy_publish(session: Session, report: Report, now: datetime) -> bool:
    # A publication found due while serving another request stands on its own: commit it now so
    # that request failing afterwards (a refused edit, say) cannot roll the publication back.
    if not publish_if_due(session, report, now):
        return False
    session.commit()
    return True


def public_report(session: Session, report_id: str, now: datetime | None = None) -> Report:
    """Return a published report (after a lazy embargo check); 404 for anything unpublished."""
    report = session.get(Report, report_id)
    if report is not None:
        _lazy_publish(session, report, now or utcnow())
    if report is None or report.status != "published":
        raise NotFoundError(f"report {report_id!r} does not exist or is not public", code="report_not_found")
    return report


def list_public_reports(session: Session, now: datetime | None = None) -> list[Report]:
    """Return every published report, newest first."""
    publish_due(session, now)
    stmt = select(Report).where(Report.status == "published").order_by(Report.published_at.desc())
    return list(session.scalars(stmt))


def _publish_if_agreed(session: Session, report: Report, now: datetime) -> None:
    if (
        report.release_requested_revision is not None
        and report.release_requested_revision == report.release_agreed_revision == report.submitted_revision
    ):
        _publish(session, report, "agreement", now)


def _subject(session: Session, report: Report) -> dict[str, Any]:
    """Return the report, evaluator and model version a report's ledger events speak about."""
    model = session.get(Model, report.model_id)
    version = session.get(ModelVersion, report.version_id)
    evaluator = session.get(Evaluator, report.evaluator_id)
    assert model is not None and version is not None and evaluator is not None
    return {
        "report_id": report.id,
        "evaluator": evaluator.name,
        "evaluator_id": evaluator.id,
        "model_id": model.id,
        "model": model.name,
        "version_id": version.id,
        "version": version.label,
        "version_hash": version.content_hash,
    }


def _publish(session: Session, report: Report, reason: str, now: datetime) -> bool:
    revision = _revision(report, report.submitted_revision or 0)
    # A conditional UPDATE makes concurrent lazy checks publish (and ledger) a report exactly once.
    conditions = [Report.id == report.id, Report.status == "submitted", Report.submitted_revision == revision.number]
    if reason == "deadline":
        # Checked again at write time: an extension committed meanwhile wins over a stale read.
        conditions += [Report.publish_by.is_not(None), Report.publish_by <= now]
    result = cast(
        CursorResult[Any],
        session.execute(
            update(Report)
            .where(*conditions)
            .values(
                status="published",
                published_revision=revision.number,
                published_at=now,
                published_reason=reason,
                updated_at=now,
            )
            .execution_options(synchronize_session="fetch")
        ),
    )
    if result.rowcount != 1:
        session.refresh(report)
        return False
    session.refresh(report)
    variants = sorted(set(session.scalars(select(EvalResult.variant).where(EvalResult.id.in_(revision.result_ids)))))
    ledger.record_event(
        session,
        "report.published",
        {
            **_subject(session, report),
            "variants": variants,
            "revision": revision.number,
            "content_hash": revision.content_hash,
            "result_ids": list(revision.result_ids),
            "commitments": [r.commitment for r in revision.redactions],
            "reason": reason,
            "published_at": now.isoformat(),
            "submitted_at": report.submitted_at.isoformat() if report.submitted_at else None,
            "publish_by": report.publish_by.isoformat() if report.publish_by else None,
            "extensions": len(report.extensions),
        },
    )
    return True


# ---------------------------------------------------------------- documents and verification


def build_document(
    *,
    report_id: str,
    number: int,
    previous_hash: str | None,
    evaluator: str,
    model: Model,
    version: ModelVersion,
    title: str,
    public_body: str,
    results: Sequence[EvalResult],
    attachments: Sequence[ReportAttachment],
    sealed: Sequence[redaction.Sealed],
) -> dict[str, Any]:
    """Return the public document of one revision; its canonical JSON is what the content hash covers."""
    return {
        "schema": DOCUMENT_SCHEMA,
        "report_id": report_id,
        "revision": number,
        "previous_hash": previous_hash,
        "evaluator": evaluator,
        "model": model.name,
        "version": version.label,
        "version_hash": version.content_hash,
        "title": title,
        "body": public_body,
        "results": [{"id": r.id, "signature": r.signature, "log_sha256": r.log_sha256} for r in results],
        "attachments": [
            {"id": a.id, "filename": a.filename, "media_type": a.media_type, "bytes": a.size_bytes, "sha256": a.sha256}
            for a in attachments
        ],
        "redactions": [{"number": s.number, "reason": s.reason, "commitment": s.commitment} for s in sealed],
    }


def content_hash(document: dict[str, Any]) -> str:
    """Return SHA-256 (hex) of the RFC 8785 canonical JSON of ``document``."""
    return sha256_hex(document)


@dataclass(frozen=True)
class Verification:
    """The outcome of checking a public report: each failed check is one line in ``problems``."""

    problems: list[str]
    revealed: int
    # (result id, fingerprint of the public key its signature verified with), in document order.
    signers: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every check passed."""
        return not self.problems


UNPINNED_EVALUATOR_KEY = (
    "results are signed but no evaluator key is pinned: pass the evaluator's public key (--key), "
    "obtained from the evaluator, not from the report"
)


def verify_public_report(
    data: Any, evaluator_keys: Collection[str] | None, *, trust_embedded_keys: bool = False
) -> Verification:
    """Check a public report JSON offline: content hash, commitments, reveals, signed results.

    Every result must be one the hashed document cites (same id, signature and log hash) and its
    signature must verify with one of ``evaluator_keys`` (base64 keys or their SHA-256
    fingerprints, obtained from the evaluator): a report carries its signers' keys, so a forger
    could sign with their own. Signed results without a pinned key fail, unless
    ``trust_embedded_keys`` is set explicitly. Malformed input is reported as problems, never raised.
    """
    if not isinstance(data, dict):
        return Verification(["the report is not a JSON object"], 0)
    document = data.get("document")
    if not isinstance(document, dict):
        return Verification(["the report carries no document"], 0)
    problems: list[str] = []
    try:
        # Reports hashed before RFC 8785 used the legacy form of the same document.
        hashes = {hashlib.sha256(form).hexdigest() for form in canonical_forms(document)}
        if data.get("content_hash") not in hashes:
            problems.append("content_hash does not match the document")
    except (TypeError, ValueError):
        problems.append("the document cannot be canonicalised (not plain JSON)")
    if "id" in data and data["id"] != document.get("report_id"):
        problems.append(f"id {_short(data['id'])} differs from the hashed document's report_id")
    revealed = _verify_redactions(document, data.get("redactions", []), problems)
    signers = _verify_results(document, data.get("results", []), evaluator_keys or None, problems)
    if signers and not evaluator_keys and not trust_embedded_keys:
        problems.append(UNPINNED_EVALUATOR_KEY)
    return Verification(problems, revealed, signers)


def _verify_redactions(document: dict[str, Any], shown: Any, problems: list[str]) -> int:
    hashed = document.get("redactions", [])
    numbered = isinstance(hashed, list) and all(isinstance(r, dict) and type(r.get("number")) is int for r in hashed)
    if not numbered:
        problems.append("document.redactions is not a list of numbered redactions")
        hashed = []
    commitments: dict[int, Any] = {r["number"]: r.get("commitment") for r in hashed}
    body = document.get("body", "")
    if not isinstance(body, str):
        problems.append("document.body is not a string")
        body = ""
    for hashed_number, commitment in commitments.items():
        if not isinstance(commitment, str) or f"sha256:{commitment}]]" not in body:
            problems.append(f"redaction #{hashed_number}: its placeholder is not in the body")
    if not isinstance(shown, list):
        problems.append("redactions is not a list")
        return 0
    revealed = 0
    for item in shown:
        if not isinstance(item, dict):
            problems.append(f"redactions: {_short(item)} is not an object")
            continue
        if not item.get("revealed"):
            continue
        revealed += 1
        number = item.get("number")
        if not isinstance(number, int) or commitments.get(number) != item.get("commitment"):
            problems.append(f"redaction #{number}: commitment differs from the hashed document")
        if not redaction.verify_commitment(str(item.get("commitment")), str(item.get("salt")), str(item.get("text"))):
            problems.append(f"redaction #{number}: SHA-256(salt || text) does not equal the commitment")
    return revealed


def _verify_results(
    document: dict[str, Any], shown: Any, evaluator_keys: Collection[str] | None, problems: list[str]
) -> list[tuple[str, str]]:
    cited: dict[str, dict[str, Any]] = {}
    hashed = document.get("results", [])
    for item in hashed if isinstance(hashed, list) else [None]:
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            problems.append(f"document.results: {_short(item)} is not a result reference")
        elif item["id"] in cited:
            problems.append(f"document.results: {item['id']} is cited twice")
        else:
            cited[item["id"]] = item
    if not isinstance(shown, list):
        problems.append("results is not a list")
        shown = []
    pinned = None if evaluator_keys is None else {_key_fingerprint(k) or k.lower() for k in evaluator_keys}
    signers: list[tuple[str, str]] = []
    seen: set[str] = set()
    for item in shown:
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            problems.append(f"results: {_short(item)} is not a result")
            continue
        rid = item["id"]
        if rid in seen:
            problems.append(f"result {rid}: listed twice")
            continue
        seen.add(rid)
        ref = cited.get(rid)
        if ref is None:
            problems.append(f"result {rid}: not cited by the hashed document")
            continue
        attestation, signature, public_key = item.get("attestation"), item.get("signature"), item.get("public_key")
        if not isinstance(attestation, dict) or not isinstance(signature, str) or not isinstance(public_key, str):
            problems.append(f"result {rid}: attestation, signature or public key missing")
            continue
        if signature != ref.get("signature"):
            problems.append(f"result {rid}: signature differs from the hashed document")
        log_hash = ref.get("log_sha256")
        if attestation.get("log_sha256") != log_hash or item.get("log_sha256", log_hash) != log_hash:
            problems.append(f"result {rid}: log_sha256 differs from the hashed document")
        if attestation.get("evaluator") != document.get("evaluator"):
            who = _short(attestation.get("evaluator"))
            problems.append(f"result {rid}: attested by {who}, not the report's evaluator")
        if attestation.get("version_hash") != document.get("version_hash"):
            problems.append(f"result {rid}: attests another model version than the report")
        fingerprint = _key_fingerprint(public_key)
        if fingerprint is None or not verify_signature(attestation, signature, public_key):
            problems.append(f"result {rid}: signature does not verify")
            continue
        if pinned is not None and fingerprint not in pinned:
            problems.append(f"result {rid}: signed by key {fingerprint[:16]}…, not a pinned evaluator key")
            continue
        signers.append((rid, fingerprint))
    for rid in cited.keys() - seen:
        problems.append(f"result {rid}: cited by the hashed document but missing from the report")
    return signers


def _key_fingerprint(public_b64: str) -> str | None:
    try:
        parse_public_key(public_b64)
    except InvalidRequestError:
        return None
    return fingerprint(public_b64)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:39] + "…"


# ---------------------------------------------------------------- helpers


def _revision(report: Report, number: int) -> ReportRevision:
    for revision in report.revisions:
        if revision.number == number:
            return revision
    raise NotFoundError(f"report {report.id} has no revision {number}")


def _require_submitted(report: Report) -> None:
    if report.status != "submitted":
        hint = "submit it first" if report.status == "draft" else "it is already public"
        raise ConflictError(f"report {report.id} is {report.status}: {hint}", code=f"report_{report.status}")


def _clear_release(report: Report) -> None:
    report.release_requested_revision = report.release_requested_at = report.release_requested_by = None
    report.release_agreed_revision = report.release_agreed_at = report.release_agreed_by = None


def _check_results(session: Session, principal: Principal, version_id: str, ids: Sequence[str]) -> list[EvalResult]:
    unique = list(dict.fromkeys(ids))
    if len(unique) > MAX_RESULTS:
        raise InvalidRequestError(f"a report cites at most {MAX_RESULTS} results", param="result_ids")
    rows = []
    for rid in unique:
        row = session.get(EvalResult, rid)
        if row is None or row.evaluator_id != principal.evaluator_id:
            # Another organisation's result is reported like an unknown one: ids leak nothing.
            raise NotFoundError(
                f"result {rid!r} does not exist among your organisation's results",
                code="result_not_found",
                param="result_ids",
            )
        if row.version_id != version_id:
            raise InvalidRequestError(
                f"result {rid} is about another model version than this report", code="result_wrong_version"
            )
        if not verify_stored(session, row):
            raise InvalidRequestError(
                f"result {rid}'s signature no longer verifies (its signing key was revoked?)",
                code="result_unverifiable",
            )
        rows.append(row)
    return rows


def _check_attachments(session: Session, principal: Principal, ids: Sequence[str]) -> list[ReportAttachment]:
    unique = list(dict.fromkeys(ids))
    if len(unique) > MAX_ATTACHMENTS:
        raise InvalidRequestError(f"a report has at most {MAX_ATTACHMENTS} plots", param="attachment_ids")
    rows = []
    for aid in unique:
        row = session.get(ReportAttachment, aid)
        if row is None or row.evaluator_id != principal.evaluator_id:
            raise NotFoundError(f"attachment {aid!r} does not exist", code="attachment_not_found")
        rows.append(row)
    return rows


def _add_revision(
    session: Session, report: Report, principal: Principal, content: DraftContent, actor: str, now: datetime
) -> ReportRevision:
    previous = report.revisions[-1] if report.revisions else None
    title = (content.title if content.title is not None else previous.title if previous else "").strip()
    source = content.body if content.body is not None else previous.source if previous else ""
    if not title or len(title) > MAX_TITLE_CHARS:
        raise InvalidRequestError(f"the title must be 1-{MAX_TITLE_CHARS} characters", param="title")
    if not source.strip() or len(source) > MAX_BODY_CHARS:
        raise InvalidRequestError(f"the body must be 1-{MAX_BODY_CHARS} characters", param="body")
    result_ids = content.result_ids if content.result_ids is not None else previous.result_ids if previous else []
    attachment_ids = (
        content.attachment_ids if content.attachment_ids is not None else previous.attachment_ids if previous else []
    )
    # Validate everything before writing anything: a bad request leaves no partial revision.
    pieces, spans = redaction.parse(source)
    results = _check_results(session, principal, report.version_id, result_ids)
    attachments = _check_attachments(session, principal, attachment_ids)
    sealed = redaction.seal(spans)
    public_body = redaction.render_public(pieces, sealed)
    model = session.get(Model, report.model_id)
    version = session.get(ModelVersion, report.version_id)
    assert model is not None and version is not None
    number = report.current_revision + 1
    previous_hash = previous.content_hash if previous else None
    document = build_document(
        report_id=report.id,
        number=number,
        previous_hash=previous_hash,
        evaluator=principal.evaluator_name,
        model=model,
        version=version,
        title=title,
        public_body=public_body,
        results=results,
        attachments=attachments,
        sealed=sealed,
    )
    revision = ReportRevision(
        number=number,
        title=title,
        source=source,
        public_body=public_body,
        result_ids=[r.id for r in results],
        attachment_ids=[a.id for a in attachments],
        document=document,
        content_hash=content_hash(document),
        previous_hash=previous_hash,
        created_by=actor,
        created_at=now,
        redactions=[
            ReportRedaction(number=s.number, reason=s.reason, text=s.text, salt=s.salt, commitment=s.commitment)
            for s in sealed
        ],
    )
    report.revisions.append(revision)
    report.current_revision = number
    report.updated_at = now
    session.flush()
    return revision


def signing_keys(session: Session, results: Sequence[EvalResult]) -> dict[str, str]:
    """Return fingerprint → base64 public key for the keys that signed ``results``."""
    fps = {r.key_fingerprint for r in results}
    if not fps:
        return {}
    rows = session.scalars(select(SigningKey).where(SigningKey.fingerprint.in_(fps)))
    return {k.fingerprint: k.public_key for k in rows}


def ledger_index(session: Session, report_id: str) -> int | None:
    """Return the index of the report's ``report.published`` ledger entry once integrated, else None."""
    # Entries are sequenced into the log asynchronously (and the log may be absent in older
    # schemas): until an integrated entry exists the public view simply carries no index.
    entry_table: Any = getattr(ledger_models, "LedgerEntry", None)
    if entry_table is None:
        return None
    # Entries are canonical JSON (sorted keys, no whitespace), so the id appears exactly like this.
    needle = f'"report_id":"{report_id}"'
    index: int | None = session.scalar(
        select(entry_table.idx)
        .where(entry_table.kind == "report.published", entry_table.entry.contains(needle, autoescape=True))
        .order_by(entry_table.idx)
        .limit(1)
    )
    return index
