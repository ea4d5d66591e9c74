"""remote interpretability jobs

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Placeholder until this package's tables land."""


def downgrade() -> None:
    """Placeholder until this package's tables land."""
