"""create charges

Revision ID: b2c3d4e5f6a7
Revises:
Create Date: 2026-12-02 12:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from meshgate.data.types import UTCDateTime

revision: str = "b2c3d4e5f6a7"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "charges",
        sa.Column("key", sa.String(length=200), nullable=False),
        sa.Column("order_id", sa.Integer(), nullable=True),
        sa.Column("amount_cents", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=12), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("key"),
        sa.UniqueConstraint("order_id"),
    )


def downgrade() -> None:
    op.drop_table("charges")
