"""grant seals: an HMAC over each grant's terms, under a key the database does not hold

Revision ID: 0013
Revises: 0012
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable: a migration cannot see the key. Grants issued before this revision are sealed at the
    # next start (airlock.access.seal.prepare_grant_seals) once their terms match their ledger entries.
    with op.batch_alter_table("grants", schema=None) as batch_op:
        batch_op.add_column(sa.Column("seal", sa.String(length=100), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("grants", schema=None) as batch_op:
        batch_op.drop_column("seal")
