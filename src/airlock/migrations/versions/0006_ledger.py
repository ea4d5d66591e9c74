"""ledger entries, checkpoints and commitments

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import hashlib

import sqlalchemy as sa
from alembic import op

import airlock.db
from airlock.db import utcnow

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def _bigkey() -> sa.types.TypeEngine[int]:
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "ledger_pending",
        sa.Column("seq", _bigkey(), autoincrement=True, nullable=False),
        sa.Column("event_id", sa.String(length=40), nullable=False),
        sa.Column("kind", sa.String(length=40), nullable=False),
        sa.Column("entry", sa.Text(), nullable=False),
        sa.Column("created_at", airlock.db.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("seq"),
        sa.UniqueConstraint("event_id"),
    )
    op.create_table(
        "ledger_entries",
        sa.Column("idx", _bigkey(), autoincrement=False, nullable=False),
        sa.Column("event_id", sa.String(length=40), nullable=False),
        sa.Column("kind", sa.String(length=40), nullable=False),
        sa.Column("entry", sa.Text(), nullable=False),
        sa.Column("leaf_hash", sa.LargeBinary(length=32), nullable=False),
        sa.Column("integrated_at", airlock.db.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("idx"),
        sa.UniqueConstraint("event_id"),
    )
    with op.batch_alter_table("ledger_entries", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_ledger_entries_kind"), ["kind"], unique=False)

    op.create_table(
        "ledger_nodes",
        sa.Column("key", _bigkey(), autoincrement=False, nullable=False),
        sa.Column("hash", sa.LargeBinary(length=32), nullable=False),
        sa.PrimaryKeyConstraint("key"),
    )
    state = op.create_table(
        "ledger_state",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("root_hash", sa.LargeBinary(length=32), nullable=False),
        sa.Column("audit_last_id", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", airlock.db.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    # The one sequencer row exists from the start, so replicas only ever lock it, never race to create it.
    op.bulk_insert(
        state,
        [{"id": 1, "size": 0, "root_hash": hashlib.sha256(b"").digest(), "audit_last_id": 0, "updated_at": utcnow()}],
    )
    op.create_table(
        "ledger_checkpoints",
        sa.Column("id", _bigkey(), autoincrement=True, nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("root_hash", sa.LargeBinary(length=32), nullable=False),
        sa.Column("note", sa.Text(), nullable=False),
        sa.Column("created_at", airlock.db.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("ledger_checkpoints", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_ledger_checkpoints_size"), ["size"], unique=False)

    op.create_table(
        "ledger_commitments",
        sa.Column("event_id", sa.String(length=40), nullable=False),
        sa.Column("field", sa.String(length=100), nullable=False),
        sa.Column("salt", sa.String(length=64), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.Column("commitment", sa.String(length=64), nullable=False),
        sa.Column("revealed_at", airlock.db.UTCDateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("event_id", "field"),
    )


def downgrade() -> None:
    op.drop_table("ledger_commitments")
    with op.batch_alter_table("ledger_checkpoints", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ledger_checkpoints_size"))

    op.drop_table("ledger_checkpoints")
    op.drop_table("ledger_state")
    op.drop_table("ledger_nodes")
    with op.batch_alter_table("ledger_entries", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ledger_entries_kind"))

    op.drop_table("ledger_entries")
    op.drop_table("ledger_pending")
