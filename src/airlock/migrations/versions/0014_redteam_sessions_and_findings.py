"""redteam sessions and findings

Revision ID: 0014
Revises: 0013
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import airlock.db

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "redteam_sessions",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("grant_id", sa.String(length=40), nullable=False),
        sa.Column("key_id", sa.String(length=40), nullable=False),
        sa.Column("evaluator_id", sa.String(length=40), nullable=False),
        sa.Column("model_id", sa.String(length=40), nullable=False),
        sa.Column("version_id", sa.String(length=40), nullable=False),
        sa.Column("targets", sa.JSON(), nullable=False),
        sa.Column("variants", sa.JSON(), nullable=False),
        sa.Column("title", sa.String(length=200), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("active_seconds", sa.Float(), nullable=False),
        sa.Column("turns", sa.Integer(), nullable=False),
        sa.Column("created_at", airlock.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("last_activity_at", airlock.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("closed_at", airlock.db.UTCDateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["evaluator_id"],
            ["evaluators.id"],
        ),
        sa.ForeignKeyConstraint(
            ["grant_id"],
            ["grants.id"],
        ),
        sa.ForeignKeyConstraint(
            ["key_id"],
            ["api_keys.id"],
        ),
        sa.ForeignKeyConstraint(
            ["model_id"],
            ["models.id"],
        ),
        sa.ForeignKeyConstraint(
            ["version_id"],
            ["model_versions.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("redteam_sessions", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_redteam_sessions_evaluator_id"), ["evaluator_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_redteam_sessions_grant_id"), ["grant_id"], unique=False)
        batch_op.create_index("ix_redteam_sessions_key_created", ["key_id", "created_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_redteam_sessions_version_id"), ["version_id"], unique=False)

    op.create_table(
        "redteam_turns",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("session_id", sa.String(length=40), nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("responses", sa.JSON(), nullable=False),
        sa.Column("active_seconds", sa.Float(), nullable=False),
        sa.Column("created_at", airlock.db.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["session_id"], ["redteam_sessions.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("redteam_turns", schema=None) as batch_op:
        batch_op.create_index("ix_redteam_turns_session_index", ["session_id", "index"], unique=True)

    op.create_table(
        "redteam_findings",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("session_id", sa.String(length=40), nullable=False),
        sa.Column("turn_id", sa.String(length=40), nullable=False),
        sa.Column("turn_index", sa.Integer(), nullable=False),
        sa.Column("grant_id", sa.String(length=40), nullable=False),
        sa.Column("key_id", sa.String(length=40), nullable=False),
        sa.Column("evaluator_id", sa.String(length=40), nullable=False),
        sa.Column("model_id", sa.String(length=40), nullable=False),
        sa.Column("version_id", sa.String(length=40), nullable=False),
        sa.Column("variant", sa.String(length=100), nullable=False),
        sa.Column("category", sa.String(length=16), nullable=False),
        sa.Column("severity", sa.String(length=16), nullable=False),
        sa.Column("title", sa.String(length=200), nullable=False),
        sa.Column("notes", sa.Text(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("triage_reason", sa.Text(), nullable=False),
        sa.Column("fixed_in_version_id", sa.String(length=40), nullable=True),
        sa.Column("triaged_by", sa.String(length=100), nullable=True),
        sa.Column("triaged_at", airlock.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column("created_at", airlock.db.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["evaluator_id"],
            ["evaluators.id"],
        ),
        sa.ForeignKeyConstraint(
            ["fixed_in_version_id"],
            ["model_versions.id"],
        ),
        sa.ForeignKeyConstraint(
            ["grant_id"],
            ["grants.id"],
        ),
        sa.ForeignKeyConstraint(
            ["key_id"],
            ["api_keys.id"],
        ),
        sa.ForeignKeyConstraint(
            ["model_id"],
            ["models.id"],
        ),
        sa.ForeignKeyConstraint(
            ["session_id"],
            ["redteam_sessions.id"],
        ),
        sa.ForeignKeyConstraint(
            ["turn_id"],
            ["redteam_turns.id"],
        ),
        sa.ForeignKeyConstraint(
            ["version_id"],
            ["model_versions.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("redteam_findings", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_redteam_findings_grant_id"), ["grant_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_redteam_findings_model_id"), ["model_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_redteam_findings_session_id"), ["session_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("redteam_findings", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_redteam_findings_session_id"))
        batch_op.drop_index(batch_op.f("ix_redteam_findings_model_id"))
        batch_op.drop_index(batch_op.f("ix_redteam_findings_grant_id"))

    op.drop_table("redteam_findings")
    with op.batch_alter_table("redteam_turns", schema=None) as batch_op:
        batch_op.drop_index("ix_redteam_turns_session_index")

    op.drop_table("redteam_turns")
    with op.batch_alter_table("redteam_sessions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_redteam_sessions_version_id"))
        batch_op.drop_index("ix_redteam_sessions_key_created")
        batch_op.drop_index(batch_op.f("ix_redteam_sessions_grant_id"))
        batch_op.drop_index(batch_op.f("ix_redteam_sessions_evaluator_id"))

    op.drop_table("redteam_sessions")
