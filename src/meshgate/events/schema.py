"""The tables of :mod:`meshgate.events` in a service's own database: the outbox
(events waiting for the relay), its partitions (what relays claim), leases, the
inbox (events a consumer group has applied) and the sagas with their steps.

Every name starts with a prefix (``meshgate_`` by default), so that the tables sit
beside the service's own without clashing. The migrations in
:mod:`meshgate.events.migrations` make them on SQLite, PostgreSQL and MariaDB/MySQL;
:meth:`EventTables.create_all` makes them directly (tests, development).
"""

from __future__ import annotations

import re
import zlib

from sqlalchemy import (
    BigInteger,
    Column,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
)
from sqlalchemy.dialects import mysql

from meshgate.data.types import UTCDateTime
from meshgate.errors import ConfigError, ConfigIssue

__all__ = ["DEFAULT_PREFIX", "PARTITIONS", "EventTables", "partition_of"]

DEFAULT_PREFIX = "meshgate_"
"""What the names of the tables start with."""
PARTITIONS = 16
"""Outbox partitions: events of one key share one, and a partition is relayed by one
relay at a time, which keeps the order per key while several instances share the work."""

_PREFIX_RE = re.compile(r"^[a-z][a-z0-9_]{0,30}$")

_Seq = BigInteger().with_variant(Integer(), "sqlite")
_Blob = LargeBinary().with_variant(mysql.MEDIUMBLOB(), "mysql", "mariadb")
_Long = Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb")


def partition_of(key: str) -> int:
    """The outbox partition of a key (stable across processes and versions)."""
    return zlib.crc32(key.encode()) % PARTITIONS


class EventTables:
    """The tables, named with ``prefix``."""

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        if not _PREFIX_RE.match(prefix):
            raise ConfigError(
                [
                    ConfigIssue(
                        "table_prefix",
                        f"{prefix!r} is not a table prefix; use lower-case letters, digits "
                        "and '_' (up to 31), starting with a letter, such as meshgate_",
                    )
                ]
            )
        self.prefix = prefix
        self.version_table = f"{prefix}events_version"
        """Where the events migrations record their revision."""
        self.metadata = MetaData()
        md = self.metadata
        self.outbox = Table(
            f"{prefix}outbox",
            md,
            Column("seq", _Seq, primary_key=True, autoincrement=True),
            Column("event_id", String(64), nullable=False),
            Column("topic", String(200), nullable=False),
            Column("event_key", String(200), nullable=True),
            Column("part", SmallInteger, nullable=False),
            Column("envelope", _Blob, nullable=False),
            Column("created_at", UTCDateTime(), nullable=False),
            Column("sent_at", UTCDateTime(), nullable=True),
            Index(f"{prefix}outbox_pending", "sent_at", "part", "seq"),
        )
        self.partitions = Table(
            f"{prefix}outbox_partitions",
            md,
            Column("part", SmallInteger, primary_key=True, autoincrement=False),
        )
        self.leases = Table(
            f"{prefix}leases",
            md,
            Column("name", String(100), primary_key=True),
            Column("owner", String(100), nullable=False),
            Column("until", UTCDateTime(), nullable=False),
        )
        self.inbox = Table(
            f"{prefix}inbox",
            md,
            Column("consumer", String(100), primary_key=True),
            Column("event_id", String(64), primary_key=True),
            Column("topic", String(200), nullable=False),
            Column("received_at", UTCDateTime(), nullable=False),
            Index(f"{prefix}inbox_received", "received_at"),
        )
        self.sagas = Table(
            f"{prefix}sagas",
            md,
            Column("id", String(64), primary_key=True),
            Column("name", String(100), nullable=False),
            Column("status", String(20), nullable=False),
            Column("data", _Long, nullable=False),
            Column("position", Integer, nullable=False),
            Column("error", Text, nullable=True),
            Column("lease_owner", String(100), nullable=True),
            Column("lease_until", UTCDateTime(), nullable=True),
            Column("deadline", UTCDateTime(), nullable=True),
            Column("created_at", UTCDateTime(), nullable=False),
            Column("updated_at", UTCDateTime(), nullable=False),
            Index(f"{prefix}sagas_status", "status", "lease_until"),
            Index(f"{prefix}sagas_created", "created_at"),
        )
        self.saga_steps = Table(
            f"{prefix}saga_steps",
            md,
            Column("id", _Seq, primary_key=True, autoincrement=True),
            Column("saga_id", String(64), nullable=False),
            Column("position", Integer, nullable=False),
            Column("step", String(100), nullable=False),
            Column("phase", String(12), nullable=False),
            Column("attempt", Integer, nullable=False),
            Column("status", String(12), nullable=False),
            Column("started_at", UTCDateTime(), nullable=False),
            Column("finished_at", UTCDateTime(), nullable=True),
            Column("error", Text, nullable=True),
            Column("result", _Long, nullable=True),
            Index(f"{prefix}saga_steps_saga", "saga_id", "id"),
        )
