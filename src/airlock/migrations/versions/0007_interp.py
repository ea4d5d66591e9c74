"""remote interpretability jobs

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import airlock.db

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create ``interp_jobs``."""
    op.create_table(
        "interp_jobs",
        sa.Column("id", sa.String(length=48), nullable=False),
        sa.Column("evaluator_id", sa.String(length=40), nullable=False),
        sa.Column("grant_id", sa.String(length=40), nullable=False),
        sa.Column("model", sa.String(length=255), nullable=False),
        sa.Column("version_id", sa.String(length=40), nullable=False),
        sa.Column("variant_id", sa.String(length=40), nullable=False),
        sa.Column("content_hash", sa.String(length=64), nullable=False),
        sa.Column("filename", sa.String(length=255), nullable=False),
        sa.Column("entry_point", sa.String(length=128), nullable=False),
        sa.Column("code_sha256", sa.String(length=64), nullable=False),
        sa.Column("code_bytes", sa.BigInteger(), nullable=False),
        sa.Column("args", sa.JSON(), nullable=False),
        sa.Column("limits", sa.JSON(), nullable=False),
        sa.Column("usage", sa.JSON(), nullable=False),
        sa.Column("cpu_seconds", sa.Float(), nullable=False),
        sa.Column("logs", sa.Text(), nullable=False),
        sa.Column("result_bytes", sa.BigInteger(), nullable=False),
        sa.Column("result_sha256", sa.String(length=64), nullable=True),
        sa.Column("result_arrays", sa.JSON(), nullable=False),
        sa.Column("review_state", sa.String(length=16), nullable=False),
        sa.Column("review_reasons", sa.JSON(), nullable=False),
        sa.Column("reviewer", sa.String(length=255), nullable=True),
        sa.Column("review_note", sa.Text(), nullable=True),
        sa.Column("reviewed_at", airlock.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column("created_at", airlock.db.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["id"], ["jobs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("interp_jobs", schema=None) as batch_op:
        batch_op.create_index("ix_interp_jobs_grant_created", ["grant_id", "created_at"], unique=False)
        batch_op.create_index("ix_interp_jobs_review_state", ["review_state", "created_at"], unique=False)


def downgrade() -> None:
    """Drop ``interp_jobs``."""
    with op.batch_alter_table("interp_jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_interp_jobs_review_state")
        batch_op.drop_index("ix_interp_jobs_grant_created")
    op.drop_table("interp_jobs")
