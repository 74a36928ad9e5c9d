"""The manifest of an archive: what was backed up, from where, at which point, and the
checksums that prove a copy complete.

It is ``manifest.json`` inside the archive (see :mod:`meshgate.data.backup.archive`),
written last, and its own SHA-256 is in the archive's comment. Reading one validates
every field: an archive whose manifest does not parse is refused before anything
else is read.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "ColumnEntry",
    "EngineName",
    "ForeignKeyEntry",
    "IndexEntry",
    "LogicalType",
    "Manifest",
    "MemberEntry",
    "MigrationsEntry",
    "NativeEntry",
    "OutboxEntry",
    "ServiceEntry",
    "SnapshotEntry",
    "SourceEntry",
    "TableEntry",
]

FORMAT: Final = "meshgate-backup"
"""The ``format`` of every manifest."""
FORMAT_VERSION: Final = 1
"""The version of the archive format this code writes and reads."""

LogicalType = Literal[
    "integer",
    "boolean",
    "float",
    "decimal",
    "string",
    "text",
    "datetime",
    "date",
    "time",
    "bytes",
    "json",
    "uuid",
    "other",
]
"""A column's type in engine-independent terms; values are encoded by it (docs/backup.md)."""

EngineName = Literal["sqlite", "postgresql", "mysql", "mariadb"]
"""A source engine."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ColumnEntry(_Model):
    """One column of a table. Parameters that do not apply are left out of the JSON."""

    name: str
    type: LogicalType
    nullable: bool = True
    length: int | None = None
    """Characters of a ``string``."""
    precision: int | None = None
    """Digits of a ``decimal``."""
    scale: int | None = None
    """Digits after the point of a ``decimal``."""
    timezone: bool = False
    """A ``datetime`` stored with its zone (PostgreSQL ``timestamptz``); values are UTC anyway."""
    size: Literal["small", "normal", "big"] | None = None
    """The width of an ``integer``."""
    autoincrement: bool = False
    """Whether the database numbers new rows (serial, identity, AUTO_INCREMENT)."""
    sql: str = ""
    """The column's type as the source engine names it, for people."""

    @model_serializer(mode="wrap")
    def _compact(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        fields = type(self).model_fields
        return {k: v for k, v in data.items() if k == "name" or v != fields[k].default}


class IndexEntry(_Model):
    """An index or a unique constraint."""

    name: str | None
    columns: tuple[str, ...]
    unique: bool = False


class ForeignKeyEntry(_Model):
    """A foreign key."""

    name: str | None
    columns: tuple[str, ...]
    table: str
    referred: tuple[str, ...]
    ondelete: str | None = None
    onupdate: str | None = None


class TableEntry(_Model):
    """One table: its schema, where its rows are, and their proof."""

    name: str
    columns: tuple[ColumnEntry, ...]
    primary_key: tuple[str, ...] = ()
    indexes: tuple[IndexEntry, ...] = ()
    unique: tuple[IndexEntry, ...] = ()
    foreign_keys: tuple[ForeignKeyEntry, ...] = ()
    rows: int = Field(ge=0)
    """How many rows the snapshot held."""
    digest: str
    """The rows' checksum: the sum modulo 2**256 of the SHA-256 of each row's canonical
    line, in hex. It does not depend on the order of the rows, so that a copy in
    another engine (which sorts text its own way) proves the same."""
    member: str | None = None
    """The archive member holding the rows (JSON Lines); None in a native archive."""


class MemberEntry(_Model):
    """A file inside the archive."""

    sha256: str
    """The SHA-256 of its uncompressed bytes."""
    bytes: int = Field(ge=0)
    """Its uncompressed size."""


class SourceEntry(_Model):
    """Where the data came from."""

    engine: EngineName
    version: str
    """The server's (or SQLite library's) version."""
    database: str
    """The database name (PostgreSQL, MariaDB) or file (SQLite)."""
    url: str
    """The URL with its password masked."""


class SnapshotEntry(_Model):
    """The point the copy stands for."""

    taken_at: datetime
    """When the snapshot was taken (UTC)."""
    method: str
    """How consistency was had: the transaction or API used."""
    position: dict[str, str | int | None] = Field(default_factory=dict)
    """Engine positions of the snapshot: PostgreSQL ``wal_lsn`` and ``txid_snapshot``,
    MariaDB ``gtid_current_pos`` and the binlog file/position, SQLite ``data_version``."""
    notes: tuple[str, ...] = ()
    """What the snapshot does not cover (tables of a non-transactional engine, ...)."""


class MigrationsEntry(_Model):
    """The schema's migration version."""

    revision: str | None
    """The revision the database was at (None: no version table, or empty)."""
    version_table: str
    lineage: tuple[str, ...] = ()
    """The revisions from ``revision`` back to the first, when the migrations were at
    hand: tells a newer schema of the same service from another service's."""


class OutboxEntry(_Model):
    """The position of the service's transactional outbox in the snapshot."""

    table: str
    column: str
    position: int | str | None
    """The highest value of ``column`` (None: the outbox was empty)."""


class ServiceEntry(_Model):
    """The service the database belongs to."""

    name: str
    ref: str
    """How it was named on the command line (a name or a module path)."""


class NativeEntry(_Model):
    """A native dump inside the archive (``method: native``)."""

    tool: str
    version: str
    member: str
    format: str
    """``pg_dump-custom``, ``mariadb-dump-sql`` or ``sqlite-database``."""


class Manifest(_Model):
    """Everything an archive says about itself."""

    format: Literal["meshgate-backup"] = FORMAT
    format_version: int = FORMAT_VERSION
    meshgate_version: str
    created_at: datetime
    service: ServiceEntry
    method: Literal["logical", "native"]
    source: SourceEntry
    snapshot: SnapshotEntry
    migrations: MigrationsEntry
    outbox: OutboxEntry | None
    """None when the database has no outbox table (docs/backup.md)."""
    tables: tuple[TableEntry, ...]
    """In an order that loads referenced tables first."""
    members: dict[str, MemberEntry]
    native: NativeEntry | None = None
    rows: int = Field(ge=0)
    """Rows of every table."""
    bytes: int = Field(ge=0)
    """Uncompressed bytes of every member but the manifest."""
    duration_s: float = Field(ge=0)
    """Seconds the backup took, snapshot to archive closed."""

    def table(self, name: str) -> TableEntry | None:
        """The table called ``name``, if the archive has it."""
        return next((t for t in self.tables if t.name == name), None)
