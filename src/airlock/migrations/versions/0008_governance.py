"""gate decisions and overrides

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Placeholder until this package's tables land."""


def downgrade() -> None:
    """Placeholder until this package's tables land."""
