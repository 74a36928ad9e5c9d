"""outbox, partitions, leases, inbox, sagas and saga steps

Revision ID: e1a0c0f1b2d3
Revises:
Create Date: 2026-12-02 12:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

from meshgate.data.types import UTCDateTime
from meshgate.events.migrations import PREFIX_ATTRIBUTE

revision: str = "e1a0c0f1b2d3"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PARTITIONS = 16

Seq = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Blob = sa.LargeBinary().with_variant(mysql.MEDIUMBLOB(), "mysql", "mariadb")
Long = sa.Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb")


def _prefix() -> str:
    config = op.get_context().config
    prefix: str = config.attributes[PREFIX_ATTRIBUTE] if config is not None else "meshgate_"
    return prefix


def upgrade() -> None:
    p = _prefix()
    op.create_table(
        f"{p}outbox",
        sa.Column("seq", Seq, autoincrement=True, nullable=False),
        sa.Column("event_id", sa.String(64), nullable=False),
        sa.Column("topic", sa.String(200), nullable=False),
        sa.Column("event_key", sa.String(200), nullable=True),
        sa.Column("part", sa.SmallInteger(), nullable=False),
        sa.Column("envelope", Blob, nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("sent_at", UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("seq"),
    )
    op.create_index(f"{p}outbox_pending", f"{p}outbox", ["sent_at", "part", "seq"])
    partitions = op.create_table(
        f"{p}outbox_partitions",
        sa.Column("part", sa.SmallInteger(), autoincrement=False, nullable=False),
        sa.PrimaryKeyConstraint("part"),
    )
    op.bulk_insert(partitions, [{"part": n} for n in range(PARTITIONS)])
    op.create_table(
        f"{p}leases",
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("owner", sa.String(100), nullable=False),
        sa.Column("until", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_table(
        f"{p}inbox",
        sa.Column("consumer", sa.String(100), nullable=False),
        sa.Column("event_id", sa.String(64), nullable=False),
        sa.Column("topic", sa.String(200), nullable=False),
        sa.Column("received_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("consumer", "event_id"),
    )
    op.create_index(f"{p}inbox_received", f"{p}inbox", ["received_at"])
    op.create_table(
        f"{p}sagas",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("data", Long, nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("lease_owner", sa.String(100), nullable=True),
        sa.Column("lease_until", UTCDateTime(), nullable=True),
        sa.Column("deadline", UTCDateTime(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(f"{p}sagas_status", f"{p}sagas", ["status", "lease_until"])
    op.create_index(f"{p}sagas_created", f"{p}sagas", ["created_at"])
    op.create_table(
        f"{p}saga_steps",
        sa.Column("id", Seq, autoincrement=True, nullable=False),
        sa.Column("saga_id", sa.String(64), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("step", sa.String(100), nullable=False),
        sa.Column("phase", sa.String(12), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(12), nullable=False),
        sa.Column("started_at", UTCDateTime(), nullable=False),
        sa.Column("finished_at", UTCDateTime(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("result", Long, nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(f"{p}saga_steps_saga", f"{p}saga_steps", ["saga_id", "id"])


def downgrade() -> None:
    p = _prefix()
    for table in ("saga_steps", "sagas", "inbox", "leases", "outbox_partitions", "outbox"):
        op.drop_table(f"{p}{table}")
