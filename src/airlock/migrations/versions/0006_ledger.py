"""ledger entries, checkpoints and commitments

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Placeholder until this package's tables land."""


def downgrade() -> None:
    """Placeholder until this package's tables land."""
