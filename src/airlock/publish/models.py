"""Tables of the publish package: reports, their immutable revisions, redactions, plots, comments."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import ForeignKey, Index, Integer, LargeBinary, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from airlock.db import Base, new_id, utcnow

STATUSES = ("draft", "submitted", "published")


class Report(Base):
    """An evaluator's report about one model version: its state, agreements and publication."""

    __tablename__ = "reports"
    __table_args__ = (Index("ix_reports_status_submitted", "status", "submitted_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("rpt"))
    evaluator_id: Mapped[str] = mapped_column(ForeignKey("evaluators.id"), index=True)
    grant_id: Mapped[str] = mapped_column(ForeignKey("grants.id"), index=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"), index=True)
    version_id: Mapped[str] = mapped_column(ForeignKey("model_versions.id"), index=True)
    status: Mapped[str] = mapped_column(String(16), default="draft")
    # The newest revision, and the one frozen by the last submission (what the lab reviews).
    current_revision: Mapped[int] = mapped_column(Integer, default=0)
    submitted_revision: Mapped[int | None] = mapped_column(Integer, nullable=True)
    submitted_at: Mapped[datetime | None] = mapped_column(nullable=True)
    # Early release needs both sides, each for the same submitted revision.
    release_requested_revision: Mapped[int | None] = mapped_column(Integer, nullable=True)
    release_requested_at: Mapped[datetime | None] = mapped_column(nullable=True)
    release_requested_by: Mapped[str | None] = mapped_column(String(100), nullable=True)
    release_agreed_revision: Mapped[int | None] = mapped_column(Integer, nullable=True)
    release_agreed_at: Mapped[datetime | None] = mapped_column(nullable=True)
    release_agreed_by: Mapped[str | None] = mapped_column(String(100), nullable=True)
    published_revision: Mapped[int | None] = mapped_column(Integer, nullable=True)
    published_at: Mapped[datetime | None] = mapped_column(nullable=True)
    published_reason: Mapped[str | None] = mapped_column(String(16), nullable=True)  # embargo | agreement | deadline
    # The publication clock, set at each submission: published by this time at the latest unless
    # the decider extends it (each extension is a ReportExtension row and a public ledger event).
    publish_by: Mapped[datetime | None] = mapped_column(nullable=True, index=True)
    clock_business_days: Mapped[int | None] = mapped_column(Integer, nullable=True)
    clock_calendar: Mapped[str | None] = mapped_column(String(100), nullable=True)
    created_by: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)

    revisions: Mapped[list[ReportRevision]] = relationship(
        back_populates="report", order_by="ReportRevision.number", cascade="all, delete-orphan"
    )
    comments: Mapped[list[ReportComment]] = relationship(
        back_populates="report", order_by="ReportComment.id", cascade="all, delete-orphan"
    )
    extensions: Mapped[list[ReportExtension]] = relationship(
        back_populates="report", order_by="ReportExtension.id", cascade="all, delete-orphan"
    )


class ReportRevision(Base):
    """One immutable version of a report's content, identified by its content hash."""

    __tablename__ = "report_revisions"
    __table_args__ = (UniqueConstraint("report_id", "number", name="uq_report_revision"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    report_id: Mapped[str] = mapped_column(ForeignKey("reports.id", ondelete="CASCADE"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    title: Mapped[str] = mapped_column(String(300))
    source: Mapped[str] = mapped_column(Text)  # private: the Markdown with redaction markup
    public_body: Mapped[str] = mapped_column(Text)  # spans replaced by commitment placeholders
    result_ids: Mapped[list[str]] = mapped_column(default=list)
    attachment_ids: Mapped[list[str]] = mapped_column(default=list)
    # The exact public document whose canonical JSON hashes to content_hash.
    document: Mapped[dict[str, Any]] = mapped_column(default=dict)
    content_hash: Mapped[str] = mapped_column(String(64))
    previous_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_by: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    report: Mapped[Report] = relationship(back_populates="revisions")
    redactions: Mapped[list[ReportRedaction]] = relationship(
        back_populates="revision", order_by="ReportRedaction.number", cascade="all, delete-orphan"
    )


class ReportRedaction(Base):
    """A redacted span of one revision: the private text and salt, the public commitment."""

    __tablename__ = "report_redactions"
    __table_args__ = (UniqueConstraint("revision_id", "number", name="uq_report_redaction"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    revision_id: Mapped[int] = mapped_column(ForeignKey("report_revisions.id", ondelete="CASCADE"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(String(200), default="")
    text: Mapped[str] = mapped_column(Text)
    salt: Mapped[str] = mapped_column(String(64))
    commitment: Mapped[str] = mapped_column(String(64))
    revealed_at: Mapped[datetime | None] = mapped_column(nullable=True)
    revealed_by: Mapped[str | None] = mapped_column(String(100), nullable=True)

    revision: Mapped[ReportRevision] = relationship(back_populates="redactions")


class ReportAttachment(Base):
    """A plot (PNG) uploaded by an evaluator; revisions reference it by id; immutable."""

    __tablename__ = "report_attachments"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("ratt"))
    evaluator_id: Mapped[str] = mapped_column(ForeignKey("evaluators.id"), index=True)
    filename: Mapped[str] = mapped_column(String(255))
    media_type: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    # Plots are small and capped, so the database holds them: an upload is one atomic row.
    data: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ReportComment(Base):
    """A lab comment on a report; shown beside the evaluator's text, never editing it."""

    __tablename__ = "report_comments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    report_id: Mapped[str] = mapped_column(ForeignKey("reports.id", ondelete="CASCADE"), index=True)
    revision: Mapped[int] = mapped_column(Integer)
    author: Mapped[str] = mapped_column(String(100))
    role: Mapped[str] = mapped_column(String(32))
    body: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    report: Mapped[Report] = relationship(back_populates="comments")


class ReportExtension(Base):
    """An exceptional-circumstances extension of a report's publication clock, by the lab's decider."""

    __tablename__ = "report_extensions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    report_id: Mapped[str] = mapped_column(ForeignKey("reports.id", ondelete="CASCADE"), index=True)
    revision: Mapped[int] = mapped_column(Integer)
    business_days: Mapped[int] = mapped_column(Integer)
    previous_deadline: Mapped[datetime] = mapped_column()
    new_deadline: Mapped[datetime] = mapped_column()
    justification: Mapped[str] = mapped_column(Text)
    decider: Mapped[str] = mapped_column(String(100))
    role: Mapped[str] = mapped_column(String(32))
    token_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    report: Mapped[Report] = relationship(back_populates="extensions")
