"""sealed items (content sealed to the evaluator's key)

Revision ID: 0020
Revises: 0019
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import airlock.db

revision = "0020"
down_revision = "0019"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sealed_items",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("grant_id", sa.String(length=40), nullable=False),
        sa.Column("evaluator_id", sa.String(length=40), nullable=False),
        sa.Column("capability", sa.String(length=16), nullable=False),
        sa.Column("kind", sa.String(length=40), nullable=False),
        sa.Column("ref", sa.String(length=80), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("plaintext_sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("recipient_sha256", sa.String(length=64), nullable=False),
        sa.Column("ciphertext_sha256", sa.String(length=64), nullable=False),
        sa.Column("created_at", airlock.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("released_at", airlock.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column("released_by", sa.String(length=200), nullable=True),
        sa.ForeignKeyConstraint(["evaluator_id"], ["evaluators.id"]),
        sa.ForeignKeyConstraint(["grant_id"], ["grants.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("sealed_items", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_sealed_items_evaluator_id"), ["evaluator_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_sealed_items_grant_id"), ["grant_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_sealed_items_ref"), ["ref"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("sealed_items", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_sealed_items_ref"))
        batch_op.drop_index(batch_op.f("ix_sealed_items_grant_id"))
        batch_op.drop_index(batch_op.f("ix_sealed_items_evaluator_id"))
    op.drop_table("sealed_items")
