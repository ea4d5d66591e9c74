"""admin roles: the admin token that issued each grant

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable: grants issued before this revision, or by the operator's CLI, have no issuing token.
    with op.batch_alter_table("grants", schema=None) as batch_op:
        batch_op.add_column(sa.Column("issued_by_token_id", sa.String(length=40), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("grants", schema=None) as batch_op:
        batch_op.drop_column("issued_by_token_id")
