"""report publication clock

Revision ID: 0016
Revises: 0015
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import airlock.db
from airlock.businessdays import Calendar

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None

DEFAULT_DAYS = 30


def upgrade() -> None:
    with op.batch_alter_table("reports", schema=None) as batch_op:
        batch_op.add_column(sa.Column("publish_by", airlock.db.UTCDateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("clock_business_days", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("clock_calendar", sa.String(length=100), nullable=True))
        batch_op.create_index(batch_op.f("ix_reports_publish_by"), ["publish_by"], unique=False)
    op.create_table(
        "report_extensions",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("report_id", sa.String(length=40), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("business_days", sa.Integer(), nullable=False),
        sa.Column("previous_deadline", airlock.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("new_deadline", airlock.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("justification", sa.Text(), nullable=False),
        sa.Column("decider", sa.String(length=100), nullable=False),
        sa.Column("role", sa.String(length=32), nullable=False),
        sa.Column("token_id", sa.String(length=40), nullable=True),
        sa.Column("created_at", airlock.db.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["report_id"], ["reports.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("report_extensions", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_report_extensions_report_id"), ["report_id"], unique=False)
    # Reports already waiting get the default clock from their submission: none waits forever.
    reports = sa.table(
        "reports",
        sa.column("id", sa.String),
        sa.column("status", sa.String),
        sa.column("submitted_at", airlock.db.UTCDateTime(timezone=True)),
        sa.column("publish_by", airlock.db.UTCDateTime(timezone=True)),
        sa.column("clock_business_days", sa.Integer),
        sa.column("clock_calendar", sa.String),
    )
    bind = op.get_bind()
    calendar = Calendar()
    waiting = bind.execute(
        sa.select(reports.c.id, reports.c.submitted_at).where(
            reports.c.status == "submitted", reports.c.submitted_at.is_not(None)
        )
    ).all()
    for report_id, submitted_at in waiting:
        bind.execute(
            reports.update()
            .where(reports.c.id == report_id)
            .values(
                publish_by=calendar.add_business_days(submitted_at, DEFAULT_DAYS),
                clock_business_days=DEFAULT_DAYS,
                clock_calendar=calendar.name,
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("report_extensions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_report_extensions_report_id"))
    op.drop_table("report_extensions")
    with op.batch_alter_table("reports", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_reports_publish_by"))
        batch_op.drop_column("clock_calendar")
        batch_op.drop_column("clock_business_days")
        batch_op.drop_column("publish_by")
