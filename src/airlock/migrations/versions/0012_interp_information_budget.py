"""interp information budget: full-logits and serving-budget terms on grants, served bytes per job

Revision ID: 0012
Revises: 0011
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Grants issued before this revision get top-k logits only and the model-relative default budgets.
    with op.batch_alter_table("grants", schema=None) as batch_op:
        batch_op.add_column(sa.Column("interp_full_logits", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch_op.add_column(sa.Column("quota_interp_served_bytes", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("interp_review_served_bytes", sa.BigInteger(), nullable=True))
    with op.batch_alter_table("interp_jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("served_bytes", sa.BigInteger(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("logs_withheld", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("interp_jobs", schema=None) as batch_op:
        batch_op.drop_column("logs_withheld")
        batch_op.drop_column("served_bytes")
    with op.batch_alter_table("grants", schema=None) as batch_op:
        batch_op.drop_column("interp_review_served_bytes")
        batch_op.drop_column("quota_interp_served_bytes")
        batch_op.drop_column("interp_full_logits")
