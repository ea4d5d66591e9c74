"""grant terms: the eleven quota and switch columns of a grant become one JSON ``terms`` column

Each set value is carried over under its column's name (NULL quotas and a false
``interp_full_logits`` are defaults and stay out), so every grant's seal and ledger entries
still verify. Downgrading puts the values back and refuses a grant holding a term the old
columns cannot hold.

Revision ID: 0018
Revises: 0017
"""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None

COLUMNS: dict[str, sa.types.TypeEngine[Any]] = {
    "quota_requests_per_minute": sa.Integer(),
    "quota_total_tokens": sa.BigInteger(),
    "quota_finetune_jobs": sa.Integer(),
    "quota_trained_tokens": sa.BigInteger(),
    "quota_file_bytes": sa.BigInteger(),
    "quota_interp_cpu_seconds": sa.Float(),
    "quota_result_bytes": sa.BigInteger(),
    "interp_full_logits": sa.Boolean(),
    "quota_interp_served_bytes": sa.BigInteger(),
    "interp_review_served_bytes": sa.BigInteger(),
    "embargo_days": sa.Integer(),
}


def _grants(columns: list[sa.ColumnClause[Any]]) -> sa.TableClause:
    return sa.table("grants", sa.column("id", sa.String()), *columns)


def upgrade() -> None:
    with op.batch_alter_table("grants") as batch_op:
        batch_op.add_column(sa.Column("terms", sa.JSON(), nullable=False, server_default="{}"))
    bind = op.get_bind()
    old = _grants([sa.column(name, kind) for name, kind in COLUMNS.items()])
    new = _grants([sa.column("terms", sa.JSON())])
    for row in bind.execute(sa.select(old)).mappings().all():
        terms: dict[str, Any] = {}
        for name in COLUMNS:
            value = row[name]
            if value is None or value is False:
                continue
            terms[name] = bool(value) if name == "interp_full_logits" else value
        if terms:
            bind.execute(sa.update(new).where(new.c.id == row["id"]).values(terms=dict(sorted(terms.items()))))
    with op.batch_alter_table("grants") as batch_op:
        for name in COLUMNS:
            batch_op.drop_column(name)


def downgrade() -> None:
    bind = op.get_bind()
    new = _grants([sa.column("terms", sa.JSON())])
    rows = bind.execute(sa.select(new)).mappings().all()
    for row in rows:
        terms = row["terms"] if isinstance(row["terms"], dict) else json.loads(row["terms"] or "{}")
        extra = sorted(set(terms) - set(COLUMNS))
        if extra:
            raise RuntimeError(
                f"grant {row['id']} holds terms {extra} that revision 0017 has no column for; "
                "revoke or re-issue it before downgrading"
            )
    with op.batch_alter_table("grants") as batch_op:
        for name, kind in COLUMNS.items():
            default = sa.false() if name == "interp_full_logits" else None
            batch_op.add_column(sa.Column(name, kind, nullable=default is None, server_default=default))
    old = _grants([sa.column(name, kind) for name, kind in COLUMNS.items()])
    for row in rows:
        terms = row["terms"] if isinstance(row["terms"], dict) else json.loads(row["terms"] or "{}")
        if terms:
            bind.execute(sa.update(old).where(old.c.id == row["id"]).values(**terms))
    with op.batch_alter_table("grants") as batch_op:
        batch_op.drop_column("terms")
