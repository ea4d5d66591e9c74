"""Wire schemas of reports: evaluator (private), lab and public views; a DB row never goes out whole."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from airlock.access.models import Evaluator
from airlock.evals.models import EvalResult
from airlock.evals.service import verify_stored
from airlock.publish import redaction
from airlock.publish.models import (
    Report,
    ReportAttachment,
    ReportComment,
    ReportExtension,
    ReportRedaction,
    ReportRevision,
)
from airlock.publish.service import (
    MAX_ATTACHMENTS,
    MAX_BODY_CHARS,
    MAX_COMMENT_CHARS,
    MAX_EXTENSION_JUSTIFICATION_CHARS,
    MAX_RESULTS,
    MAX_TITLE_CHARS,
    MIN_EXTENSION_JUSTIFICATION_CHARS,
    Embargo,
    embargo_of,
    signing_keys,
)
from airlock.registry.models import Model, ModelVersion


class _In(BaseModel):
    """Base of request bodies: unknown fields are an error, not silently dropped."""

    model_config = ConfigDict(extra="forbid")


class ReportCreate(_In):
    """``POST /v1/airlock/reports``: start a report about one granted model version."""

    model: str = Field(min_length=1, max_length=200, description="`name@version` (latest version when omitted).")
    title: str = Field(min_length=1, max_length=MAX_TITLE_CHARS, description="Report title.")
    body: str = Field(
        min_length=1, max_length=MAX_BODY_CHARS, description="Markdown; `[[redact:reason]]...[[/redact]]` marks spans."
    )
    result_ids: list[str] = Field(default_factory=list, max_length=MAX_RESULTS, description="Cited `res_` ids.")
    attachment_ids: list[str] = Field(default_factory=list, max_length=MAX_ATTACHMENTS, description="Plot ids.")


class ReportUpdate(_In):
    """``PATCH /v1/airlock/reports/{id}``: a new revision; omitted fields keep their value."""

    # The service refuses a patch that changes nothing; the schema says so (at least one field set).
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "anyOf": [
                {"required": [name], "properties": {name: {"type": kind}}}
                for name, kind in (
                    ("title", "string"),
                    ("body", "string"),
                    ("result_ids", "array"),
                    ("attachment_ids", "array"),
                )
            ]
        },
    )

    title: str | None = Field(default=None, min_length=1, max_length=MAX_TITLE_CHARS, description="New title.")
    body: str | None = Field(default=None, min_length=1, max_length=MAX_BODY_CHARS, description="New Markdown.")
    result_ids: list[str] | None = Field(default=None, max_length=MAX_RESULTS, description="Replaces cited results.")
    attachment_ids: list[str] | None = Field(default=None, max_length=MAX_ATTACHMENTS, description="Replaces plots.")


class RevealRequest(_In):
    """``POST /v1/airlock/reports/{id}/reveal``."""

    redaction: int = Field(ge=1, description="Number of the redaction to reveal (`#n` in its placeholder).")


class CommentCreate(_In):
    """``POST /v1/airlock/admin/reports/{id}/comments``."""

    body: str = Field(min_length=1, max_length=MAX_COMMENT_CHARS, description="The lab's comment (Markdown).")


class ExtensionCreate(_In):
    """``POST /v1/airlock/admin/reports/{id}/extend``: the decider's exceptional-circumstances extension."""

    business_days: int = Field(ge=1, le=3650, description="Business days added to the publication deadline.")
    justification: str = Field(
        min_length=MIN_EXTENSION_JUSTIFICATION_CHARS,
        max_length=MAX_EXTENSION_JUSTIFICATION_CHARS,
        description="The exceptional circumstances, in words; published with the extension.",
    )


class ExtensionPublic(BaseModel):
    """An extension of a report's publication clock, as anyone may read it."""

    revision: int = Field(description="The submitted revision whose clock it extended.")
    business_days: int = Field(description="Business days added.")
    previous_deadline: datetime = Field(description="The deadline before the extension.")
    new_deadline: datetime = Field(description="The deadline after it.")
    justification: str = Field(description="The decider's justification (public).")
    decider: str = Field(description="The lab member who decided it.")
    role: str = Field(description="Their lab role.")
    created_at: datetime = Field(description="When.")

    @classmethod
    def of(cls, row: ReportExtension) -> ExtensionPublic:
        """Build from a row."""
        return cls.model_validate(row, from_attributes=True)


class ClockPublic(BaseModel):
    """The publication clock: published by ``publish_by`` at the latest, whatever the embargo says."""

    submitted_at: datetime | None = Field(default=None, description="When the clock started (the last submission).")
    business_days: int | None = Field(default=None, description="The policy's maximum at submission.")
    calendar: str | None = Field(default=None, description="The business-day calendar it counts on.")
    publish_by: datetime | None = Field(
        default=None, description="The deadline, extensions included (null while a draft)."
    )
    extensions: list[ExtensionPublic] = Field(
        default_factory=list, description="Exceptional-circumstances extensions, oldest first."
    )

    @classmethod
    def of(cls, report: Report) -> ClockPublic:
        """Build from a report."""
        return cls(
            submitted_at=report.submitted_at,
            business_days=report.clock_business_days,
            calendar=report.clock_calendar,
            publish_by=report.publish_by,
            extensions=[ExtensionPublic.of(e) for e in report.extensions],
        )


class AttachmentPublic(BaseModel):
    """An uploaded plot."""

    id: str = Field(description="`ratt_` id to cite in `attachment_ids`.")
    filename: str = Field(description="Name given at upload.")
    media_type: str = Field(description="Always `image/png`.")
    bytes: int = Field(description="Size in bytes.")
    sha256: str = Field(description="SHA-256 of the bytes (hex).")
    created_at: datetime = Field(description="Upload time.")

    @classmethod
    def of(cls, row: ReportAttachment) -> AttachmentPublic:
        """Build from a row."""
        return cls(
            id=row.id,
            filename=row.filename,
            media_type=row.media_type,
            bytes=row.size_bytes,
            sha256=row.sha256,
            created_at=row.created_at,
        )


class RevisionSummary(BaseModel):
    """One immutable revision."""

    number: int = Field(description="Revision number, from 1.")
    content_hash: str = Field(description="SHA-256 of the canonical JSON of the revision's public document.")
    previous_hash: str | None = Field(description="Content hash of the revision before (a hash chain).")
    created_by: str = Field(description="Who made it.")
    created_at: datetime = Field(description="When.")

    @classmethod
    def of(cls, row: ReportRevision) -> RevisionSummary:
        """Build from a row."""
        return cls.model_validate(row, from_attributes=True)


class RedactionPrivate(BaseModel):
    """A redaction as its author sees it: the hidden text and the salt."""

    number: int = Field(description="`#n` of the placeholder.")
    reason: str = Field(description="Why it is redacted (public).")
    commitment: str = Field(description="SHA-256(salt || UTF-8 text), hex (public).")
    salt: str = Field(description="32-byte salt, hex (private until revealed).")
    text: str = Field(description="The redacted text (private until revealed).")
    revealed_at: datetime | None = Field(description="When it was revealed, if it was.")


class RedactionPublic(BaseModel):
    """A redaction as the public sees it: salt and text only once revealed."""

    number: int = Field(description="`#n` of the placeholder.")
    reason: str = Field(description="Why it is redacted.")
    commitment: str = Field(description="SHA-256(salt || UTF-8 text), hex.")
    revealed: bool = Field(description="Whether the author has revealed it.")
    revealed_at: datetime | None = Field(description="When it was revealed.")
    salt: str | None = Field(description="The 32-byte salt in hex, once revealed.")
    text: str | None = Field(description="The redacted text, once revealed.")

    @classmethod
    def of(cls, row: ReportRedaction) -> RedactionPublic:
        """Build from a row, hiding salt and text until revealed."""
        shown = row.revealed_at is not None
        return cls(
            number=row.number,
            reason=row.reason,
            commitment=row.commitment,
            revealed=shown,
            revealed_at=row.revealed_at,
            salt=row.salt if shown else None,
            text=row.text if shown else None,
        )


class CommentPublic(BaseModel):
    """A lab comment."""

    id: int = Field(description="Comment id.")
    revision: int = Field(description="The submitted revision it comments on.")
    author: str = Field(description="The lab member who wrote it.")
    role: str = Field(description="Their lab role.")
    body: str = Field(description="The comment.")
    created_at: datetime = Field(description="When.")

    @classmethod
    def of(cls, row: ReportComment) -> CommentPublic:
        """Build from a row."""
        return cls.model_validate(row, from_attributes=True)


class EmbargoPublic(BaseModel):
    """When the report may be published without agreement, from the grant's terms."""

    ends_at: datetime | None = Field(description="End of the embargo; null when only agreement can publish.")
    deployed_at: datetime | None = Field(description="When the model version was first deployed.")
    rule: str = Field(description="The rule that produced `ends_at`.")

    @classmethod
    def of(cls, embargo: Embargo) -> EmbargoPublic:
        """Build from the computed embargo."""
        return cls(ends_at=embargo.ends_at, deployed_at=embargo.deployed_at, rule=embargo.rule)


class ReleasePublic(BaseModel):
    """The two halves of an early-release agreement."""

    requested_revision: int | None = Field(description="Revision the evaluator asked to release early.")
    requested_at: datetime | None = Field(description="When.")
    agreed_revision: int | None = Field(description="Revision the lab agreed to release early.")
    agreed_at: datetime | None = Field(description="When.")
    agreed_by: str | None = Field(description="Lab member who agreed.")

    @classmethod
    def of(cls, report: Report) -> ReleasePublic:
        """Build from a report."""
        return cls(
            requested_revision=report.release_requested_revision,
            requested_at=report.release_requested_at,
            agreed_revision=report.release_agreed_revision,
            agreed_at=report.release_agreed_at,
            agreed_by=report.release_agreed_by,
        )


class ReportSummary(BaseModel):
    """A report in a list."""

    id: str = Field(description="`rpt_` id.")
    title: str = Field(description="Title of the newest revision the viewer may see.")
    status: str = Field(description="`draft`, `submitted` or `published`.")
    evaluator: str = Field(description="Evaluator organisation.")
    model: str = Field(description="`name@version`.")
    revision: int = Field(description="Revision shown.")
    content_hash: str = Field(description="Its content hash.")
    submitted_at: datetime | None = Field(description="Last submission.")
    published_at: datetime | None = Field(description="Publication time.")


class ResultPublic(BaseModel):
    """A cited, attested result with everything needed to check its signature offline."""

    id: str = Field(description="`res_` id.")
    task: str = Field(description="Eval task.")
    suite: str | None = Field(description="Built-in suite, if any.")
    variant: str = Field(description="Variant evaluated.")
    samples: int = Field(description="Number of samples.")
    metrics: dict[str, Any] = Field(description="Metrics with confidence intervals.")
    log_sha256: str = Field(description="SHA-256 of the eval log.")
    attestation: dict[str, Any] = Field(description="The signed attestation (sign its canonical JSON).")
    signature: str = Field(description="Ed25519 signature, base64.")
    public_key: str | None = Field(description="The evaluator's registered Ed25519 public key, base64.")
    signature_valid: bool = Field(description="Whether the lab verifies the signature now.")


class _ReportBase(BaseModel):
    id: str = Field(description="`rpt_` id.")
    status: str = Field(description="`draft`, `submitted` or `published`.")
    evaluator: str = Field(description="Evaluator organisation.")
    model: str = Field(description="Model name.")
    version: str = Field(description="Version label.")
    version_hash: str = Field(description="Content hash of the version's weights.")
    revision: int = Field(description="Revision shown.")
    title: str = Field(description="Title.")
    public_body: str = Field(description="Markdown with redactions replaced by commitment placeholders.")
    result_ids: list[str] = Field(description="Cited results.")
    attachments: list[AttachmentPublic] = Field(description="Plots.")
    content_hash: str = Field(description="SHA-256 of the canonical JSON of `document`.")
    document: dict[str, Any] = Field(description="The hashed public document of this revision.")
    revisions: list[RevisionSummary] = Field(description="Every revision the viewer may see.")
    comments: list[CommentPublic] = Field(description="Lab comments.")
    embargo: EmbargoPublic = Field(description="Embargo from the grant terms.")
    release: ReleasePublic = Field(description="Early-release agreement.")
    clock: ClockPublic = Field(description="The publication clock and its extensions.")
    submitted_revision: int | None = Field(description="Revision frozen by the last submission.")
    published_at: datetime | None = Field(description="Publication time.")
    published_reason: str | None = Field(description="`embargo`, `agreement` or `deadline` (the publication clock).")


class ReportPrivate(_ReportBase):
    """The evaluator's view of their report: the newest revision with its source and salts."""

    body: str = Field(description="The Markdown source with redaction markup.")
    redactions: list[RedactionPrivate] = Field(description="Redactions with their texts and salts.")


class ReportLabView(_ReportBase):
    """The lab's view: the submitted revision's public projection (redacted spans stay hidden)."""

    redactions: list[RedactionPublic] = Field(description="Commitments of the redacted spans.")


class ReportPublicView(BaseModel):
    """A published report as anyone may read and verify it."""

    id: str = Field(description="`rpt_` id.")
    title: str = Field(description="Title.")
    evaluator: str = Field(description="Evaluator organisation.")
    model: str = Field(description="Model name.")
    version: str = Field(description="Version label.")
    version_hash: str = Field(description="Content hash of the version's weights.")
    revision: int = Field(description="Published revision.")
    body: str = Field(description="Published Markdown with commitment placeholders (as hashed).")
    body_revealed: str = Field(description="`body` with revealed spans filled in (not hashed).")
    redactions: list[RedactionPublic] = Field(description="Commitments; salt and text once revealed.")
    results: list[ResultPublic] = Field(description="Cited attested results.")
    attachments: list[AttachmentPublic] = Field(description="Plots; bytes at `/public/reports/{id}/attachments/{a}`.")
    lab_comments: list[CommentPublic] = Field(description="The lab's comments, beside (never inside) the text.")
    content_hash: str = Field(description="SHA-256 of the canonical JSON of `document`; recorded in the ledger.")
    document: dict[str, Any] = Field(description="The hashed public document.")
    published_at: datetime = Field(description="Publication time.")
    published_reason: str = Field(description="`embargo`, `agreement` or `deadline` (the publication clock).")
    embargo: EmbargoPublic = Field(description="Embargo from the grant terms.")
    clock: ClockPublic = Field(
        default_factory=ClockPublic, description="The publication clock and any extensions the lab recorded."
    )
    ledger_index: int | None = Field(description="Index of the `report.published` ledger entry, once integrated.")


class PublicReportItem(BaseModel):
    """A published report in the public list."""

    id: str = Field(description="`rpt_` id.")
    title: str = Field(description="Title.")
    evaluator: str = Field(description="Evaluator organisation.")
    model: str = Field(description="`name@version`.")
    content_hash: str = Field(description="Content hash of the published revision.")
    published_at: datetime = Field(description="Publication time.")
    url: str = Field(description="Path of the report's JSON.")


# ---------------------------------------------------------------- builders


def _names(session: Session, report: Report) -> tuple[str, Model, ModelVersion]:
    evaluator = session.get(Evaluator, report.evaluator_id)
    model = session.get(Model, report.model_id)
    version = session.get(ModelVersion, report.version_id)
    assert evaluator is not None and model is not None and version is not None
    return evaluator.name, model, version


def _revision(report: Report, number: int) -> ReportRevision:
    return next(r for r in report.revisions if r.number == number)


def _attachments(session: Session, ids: list[str]) -> list[AttachmentPublic]:
    rows = {a.id: a for a in session.scalars(select(ReportAttachment).where(ReportAttachment.id.in_(ids)))}
    return [AttachmentPublic.of(rows[i]) for i in ids if i in rows]


def _base(
    session: Session, report: Report, revision: ReportRevision, revisions: list[ReportRevision]
) -> dict[str, Any]:
    evaluator, model, version = _names(session, report)
    return {
        "id": report.id,
        "status": report.status,
        "evaluator": evaluator,
        "model": model.name,
        "version": version.label,
        "version_hash": version.content_hash,
        "revision": revision.number,
        "title": revision.title,
        "public_body": revision.public_body,
        "result_ids": list(revision.result_ids),
        "attachments": _attachments(session, list(revision.attachment_ids)),
        "content_hash": revision.content_hash,
        "document": revision.document,
        "revisions": [RevisionSummary.of(r) for r in revisions],
        "comments": [CommentPublic.of(c) for c in report.comments],
        "embargo": EmbargoPublic.of(embargo_of(session, report)),
        "release": ReleasePublic.of(report),
        "clock": ClockPublic.of(report),
        "submitted_revision": report.submitted_revision,
        "published_at": report.published_at,
        "published_reason": report.published_reason,
    }


def private_view(session: Session, report: Report) -> ReportPrivate:
    """Return the evaluator's view of ``report`` (newest revision, with secrets)."""
    revision = _revision(report, report.current_revision)
    return ReportPrivate(
        **_base(session, report, revision, list(report.revisions)),
        body=revision.source,
        redactions=[
            RedactionPrivate(
                number=r.number,
                reason=r.reason,
                commitment=r.commitment,
                salt=r.salt,
                text=r.text,
                revealed_at=r.revealed_at,
            )
            for r in revision.redactions
        ],
    )


def lab_view(session: Session, report: Report) -> ReportLabView:
    """Return the lab's view of ``report`` (its submitted or published revision, no secrets)."""
    number = report.published_revision or report.submitted_revision
    assert number is not None
    revision = _revision(report, number)
    # The lab sees revisions up to the one last submitted; drafts after it stay the evaluator's.
    shown = [r for r in report.revisions if r.number <= (report.submitted_revision or 0)]
    return ReportLabView(
        **_base(session, report, revision, shown),
        redactions=[RedactionPublic.of(r) for r in revision.redactions],
    )


def summary(session: Session, report: Report, *, lab: bool = False) -> ReportSummary:
    """Return a list item; the lab sees the submitted revision, the evaluator the newest."""
    number = (report.published_revision or report.submitted_revision) if lab else report.current_revision
    revision = _revision(report, number or report.current_revision)
    evaluator, model, version = _names(session, report)
    return ReportSummary(
        id=report.id,
        title=revision.title,
        status=report.status,
        evaluator=evaluator,
        model=f"{model.name}@{version.label}",
        revision=revision.number,
        content_hash=revision.content_hash,
        submitted_at=report.submitted_at,
        published_at=report.published_at,
    )


def render_revealed(body: str, redactions: list[ReportRedaction]) -> str:
    """Return ``body`` with each revealed placeholder followed by its text, marked as revealed."""
    for r in redactions:
        if r.revealed_at is not None:
            mark = redaction.placeholder(r.number, r.reason, r.commitment)
            body = body.replace(mark, r.text + redaction.revealed_marker(r.number, r.commitment))
    return body


def public_view(session: Session, report: Report, ledger_index: int | None) -> ReportPublicView:
    """Return the public view of a published report."""
    assert report.published_revision is not None and report.published_at is not None
    revision = _revision(report, report.published_revision)
    evaluator, model, version = _names(session, report)
    rows = {r.id: r for r in session.scalars(select(EvalResult).where(EvalResult.id.in_(revision.result_ids)))}
    results = [rows[i] for i in revision.result_ids if i in rows]
    keys = signing_keys(session, results)
    return ReportPublicView(
        id=report.id,
        title=revision.title,
        evaluator=evaluator,
        model=model.name,
        version=version.label,
        version_hash=version.content_hash,
        revision=revision.number,
        body=revision.public_body,
        body_revealed=render_revealed(revision.public_body, list(revision.redactions)),
        redactions=[RedactionPublic.of(r) for r in revision.redactions],
        results=[
            ResultPublic(
                id=r.id,
                task=r.task,
                suite=r.suite,
                variant=r.variant,
                samples=r.samples,
                metrics=r.metrics,
                log_sha256=r.log_sha256,
                attestation=r.attestation,
                signature=r.signature,
                public_key=keys.get(r.key_fingerprint),
                signature_valid=verify_stored(session, r),
            )
            for r in results
        ],
        attachments=_attachments(session, list(revision.attachment_ids)),
        lab_comments=[CommentPublic.of(c) for c in report.comments],
        content_hash=revision.content_hash,
        document=revision.document,
        published_at=report.published_at,
        published_reason=report.published_reason or "",
        embargo=EmbargoPublic.of(embargo_of(session, report)),
        clock=ClockPublic.of(report),
        ledger_index=ledger_index,
    )


def public_item(session: Session, report: Report) -> PublicReportItem:
    """Return a public list item."""
    assert report.published_revision is not None and report.published_at is not None
    revision = _revision(report, report.published_revision)
    evaluator, model, version = _names(session, report)
    return PublicReportItem(
        id=report.id,
        title=revision.title,
        evaluator=evaluator,
        model=f"{model.name}@{version.label}",
        content_hash=revision.content_hash,
        published_at=report.published_at,
        url=f"/public/reports/{report.id}",
    )


def public_markdown(view: ReportPublicView) -> str:
    """Render the public view as one Markdown document (revealed spans filled in)."""
    lines = [
        f"# {view.title}",
        "",
        f"*{view.evaluator}* on **{view.model}@{view.version}** (`{view.version_hash[:12]}`), "
        f"revision {view.revision}, published {view.published_at.isoformat()} ({view.published_reason}).",
        f"Content hash `sha256:{view.content_hash}`.",
        "",
        view.body_revealed.rstrip(),
        "",
    ]
    if view.results:
        lines += ["## Attested results", ""]
        for r in view.results:
            metrics = ", ".join(f"{k}={v.get('value')}" for k, v in r.metrics.items() if isinstance(v, dict))
            ok = "signature valid" if r.signature_valid else "SIGNATURE NOT VERIFIED"
            lines.append(f"- `{r.id}` {r.task} on {r.variant} (n={r.samples}): {metrics} — {ok}")
        lines.append("")
    if view.clock.extensions:
        lines += ["## Publication delayed by the lab", ""]
        for x in view.clock.extensions:
            lines.append(
                f"- {x.created_at.isoformat()}: {x.decider} ({x.role}) extended the deadline by {x.business_days} "
                f"business day(s), {x.previous_deadline.isoformat()} → {x.new_deadline.isoformat()}: {x.justification}"
            )
        lines.append("")
    if view.lab_comments:
        lines += ["## Lab comments", ""]
        for c in view.lab_comments:
            quoted = c.body.replace("\n", "\n> ")
            lines.append(f"> **{c.author}** ({c.role}, {c.created_at.isoformat()}): {quoted}")
            lines.append("")
    return "\n".join(lines)
