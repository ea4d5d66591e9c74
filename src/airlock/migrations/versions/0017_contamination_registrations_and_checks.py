"""contamination registrations and checks

Revision ID: 0017
Revises: 0016
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import airlock.db

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "contamination_checks",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("actor", sa.String(length=200), nullable=False),
        sa.Column("role", sa.String(length=40), nullable=False),
        sa.Column("token_id", sa.String(length=40), nullable=True),
        sa.Column("corpus", sa.String(length=200), nullable=False),
        sa.Column("registrations", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("documents", sa.Integer(), nullable=True),
        sa.Column("matched_documents", sa.Integer(), nullable=True),
        sa.Column("corpus_digest", sa.String(length=64), nullable=True),
        sa.Column("created_at", airlock.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("completed_at", airlock.db.UTCDateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "contamination_registrations",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("evaluator_id", sa.String(length=40), nullable=False),
        sa.Column("grant_id", sa.String(length=40), nullable=False),
        sa.Column("key_id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("salt", sa.String(length=256), nullable=False),
        sa.Column("ngram", sa.Integer(), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("min_shingles", sa.Integer(), nullable=False),
        sa.Column("item_count", sa.Integer(), nullable=False),
        sa.Column("shingle_count", sa.Integer(), nullable=False),
        sa.Column("skipped", sa.Integer(), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("item_ids", sa.JSON(), nullable=False),
        sa.Column("sizes", sa.LargeBinary(), nullable=False),
        sa.Column("hashes", sa.LargeBinary(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("created_at", airlock.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("withdrawn_at", airlock.db.UTCDateTime(timezone=True), nullable=True),
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
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("contamination_registrations", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_contamination_registrations_evaluator_id"), ["evaluator_id"], unique=False)

    op.create_table(
        "contamination_hits",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("check_id", sa.String(length=40), nullable=False),
        sa.Column("registration_id", sa.String(length=40), nullable=False),
        sa.Column("item_id", sa.String(length=200), nullable=False),
        sa.Column("documents", sa.Integer(), nullable=False),
        sa.Column("max_fraction", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(
            ["check_id"],
            ["contamination_checks.id"],
        ),
        sa.ForeignKeyConstraint(
            ["registration_id"],
            ["contamination_registrations.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("contamination_hits", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_contamination_hits_check_id"), ["check_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_contamination_hits_registration_id"), ["registration_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("contamination_hits", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_contamination_hits_registration_id"))
        batch_op.drop_index(batch_op.f("ix_contamination_hits_check_id"))

    op.drop_table("contamination_hits")
    with op.batch_alter_table("contamination_registrations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_contamination_registrations_evaluator_id"))

    op.drop_table("contamination_registrations")
    op.drop_table("contamination_checks")
