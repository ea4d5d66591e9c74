"""grant acceptances

Revision ID: 0019
Revises: 0018
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import airlock.db

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "grant_acceptances",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("grant_id", sa.String(length=40), nullable=False),
        sa.Column("evaluator_id", sa.String(length=40), nullable=False),
        sa.Column("terms_sha256", sa.String(length=64), nullable=False),
        sa.Column("signing_key_fingerprint", sa.String(length=64), nullable=False),
        sa.Column("seal_public_key", sa.String(length=64), nullable=False),
        sa.Column("signature", sa.String(length=100), nullable=False),
        sa.Column("accepted_at", airlock.db.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["grant_id"], ["grants.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("grant_acceptances", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_grant_acceptances_grant_id"), ["grant_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("grant_acceptances", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_grant_acceptances_grant_id"))
    op.drop_table("grant_acceptances")
