"""The contract of an engine module of backup and restore: how to open a consistent
snapshot, stream a table, bulk-load one, and what the driver wants for each type.

Engines work on synchronous SQLAlchemy connections with the engines' synchronous
drivers (sqlite3, psycopg, PyMySQL): a backup is one long, sequential stream, and
the raw DBAPI cursors (server-side on PostgreSQL and MariaDB) are the fastest way
through it.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

import sqlalchemy as sa
from sqlalchemy.engine import URL

from meshgate.data._engines import mask_url
from meshgate.data.backup.codec import Converter
from meshgate.data.backup.errors import BackupError, NativeToolError
from meshgate.data.backup.manifest import ColumnEntry, EngineName, LogicalType, NativeEntry

__all__ = ["BATCH", "Engine", "NativeDump", "Snapshot", "database_errors"]

BATCH = 5000
"""Rows fetched or inserted per round trip."""


@contextmanager
def database_errors(engine: Engine, action: str) -> Iterator[None]:
    """Driver errors become :class:`BackupError` naming the action and the database
    (meshgate's own errors pass through)."""
    try:
        yield
    except sa.exc.DBAPIError as exc:
        reason = str(exc.orig).strip() or type(exc.orig).__name__
        raise BackupError(f"{action} of {engine.masked_url} failed: {reason}") from exc


@dataclass
class Snapshot:
    """An open, consistent, read-only view of the source database."""

    conn: sa.Connection
    taken_at: datetime
    method: str
    version: str
    engine: EngineName
    """``sqlite``, ``postgresql``, ``mysql`` or ``mariadb``."""
    position: dict[str, str | int | None] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    native: Callable[[Path], NativeDump] | None = None
    """Writes the engine's native dump of this very snapshot into a folder (None:
    the engine cannot share its snapshot with its tool)."""


@dataclass(frozen=True)
class NativeDump:
    """A native dump written to a file."""

    path: Path
    entry: NativeEntry


class Engine:
    """One engine: see the module docstring. ``url`` is the synchronous URL."""

    name: ClassVar[str]
    """The source engine as the manifest names it (MySQL refines it to mariadb)."""
    driver: ClassVar[str]
    """The module of the synchronous driver."""
    extra: ClassVar[str]
    """The pip extra of meshgate that installs it."""
    native_tools: ClassVar[tuple[str, ...]] = ()
    """The programs a native backup needs."""

    def __init__(self, url: URL) -> None:
        self.url = url
        self._engine: sa.Engine | None = None

    @property
    def masked_url(self) -> str:
        return mask_url(self.url)

    @property
    def database(self) -> str:
        return self.url.database or ""

    def engine(self) -> sa.Engine:
        """The SQLAlchemy engine (no pool: each operation has its own connection)."""
        if self._engine is None:
            self._engine = sa.create_engine(self.url, poolclass=sa.NullPool)
            self.setup(self._engine)
        return self._engine

    def dispose(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    def setup(self, engine: sa.Engine) -> None:
        """Per-connection setup (session time zone, transaction mode)."""

    def missing_tools(self) -> list[str]:
        """The native programs that are not on PATH."""
        return [tool for tool in self.native_tools if shutil.which(tool) is None]

    def need_tools(self) -> None:
        missing = self.missing_tools()
        if missing:
            raise NativeToolError(
                f"a native {self.name} backup or restore needs {', '.join(missing)}, which "
                f"{'is' if len(missing) == 1 else 'are'} not on PATH: install "
                f"{self.tool_package()}, or use the portable logical method (--method logical)"
            )

    def tool_package(self) -> str:
        return "the engine's client tools"

    # -- backup

    def snapshot(self, workdir: Path, *, native: bool = False) -> AbstractContextManager[Snapshot]:
        """A consistent read-only snapshot for as long as the context lasts; ``native``
        asks that :attr:`Snapshot.native` be set."""
        raise NotImplementedError

    def tables(self, conn: sa.Connection) -> list[str]:
        """The base tables of the database (no views), sorted."""
        return sorted(sa.inspect(conn).get_table_names())

    def column_overrides(self, conn: sa.Connection, table: str) -> Mapping[str, LogicalType]:
        """Logical types the engine knows better than reflection does."""
        return {}

    def estimate_rows(self, conn: sa.Connection, table: str) -> int | None:
        """A cheap guess of a table's rows, for the progress bar."""
        return None

    def quote(self, conn: sa.Connection, name: str) -> str:
        return str(conn.dialect.identifier_preparer.quote(name))

    def select_expression(self, conn: sa.Connection, column: ColumnEntry) -> str:
        """How to select ``column`` so that its codec encoder takes the driver's value."""
        return self.quote(conn, column.name)

    def select_sql(
        self,
        conn: sa.Connection,
        table: str,
        columns: Sequence[ColumnEntry],
        order_by: Sequence[str],
    ) -> str:
        cols = ", ".join(self.select_expression(conn, c) for c in columns)
        sql = f"SELECT {cols} FROM {self.quote(conn, table)}"  # noqa: S608 - quoted names
        if order_by:
            sql += " ORDER BY " + ", ".join(self.quote(conn, c) for c in order_by)
        return sql

    def stream(self, conn: sa.Connection, sql: str, batch: int = BATCH) -> Iterator[Sequence[Any]]:
        """The result of ``sql`` in lists of rows, without holding it all in memory."""
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            cursor.execute(sql)
            while rows := cursor.fetchmany(batch):
                yield rows
        finally:
            cursor.close()

    def outbox_position(self, conn: sa.Connection, table: str, column: str) -> int | str | None:
        value = conn.exec_driver_sql(
            f"SELECT MAX({self.quote(conn, column)}) FROM {self.quote(conn, table)}"  # noqa: S608
        ).scalar()
        return value if value is None or isinstance(value, int) else str(value)

    # -- restore

    def has_rows(self, conn: sa.Connection, table: str) -> bool:
        sql = f"SELECT 1 FROM {self.quote(conn, table)} LIMIT 1"  # noqa: S608 - quoted name
        return conn.exec_driver_sql(sql).first() is not None

    def drop_all(self, conn: sa.Connection, tables: Sequence[str]) -> None:
        """Drop ``tables`` (every table of the database) and what depends on them."""
        raise NotImplementedError

    @contextmanager
    def loading(self, conn: sa.Connection) -> Iterator[None]:
        """Foreign keys are not checked row by row while the block loads: rows come in an
        order that loads referenced tables first, but a table that refers to itself may
        not be in order. They hold once loading ends (the archive was consistent)."""
        yield

    def binder(self, column: ColumnEntry) -> Converter | None:
        """What the driver wants for a Python value of the target ``column`` (None: as is)."""
        return None

    def load(
        self,
        conn: sa.Connection,
        table: str,
        columns: Sequence[str],
        rows: Iterable[Sequence[Any]],
        batch: int = BATCH,
    ) -> None:
        """Insert ``rows`` (driver values, in the order of ``columns``)."""
        quoted = ", ".join(self.quote(conn, c) for c in columns)
        marks = ", ".join([self.paramstyle_mark] * len(columns))
        sql = f"INSERT INTO {self.quote(conn, table)} ({quoted}) VALUES ({marks})"  # noqa: S608
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            chunk: list[Sequence[Any]] = []
            for row in rows:
                chunk.append(row)
                if len(chunk) >= batch:
                    cursor.executemany(sql, chunk)
                    chunk = []
            if chunk:
                cursor.executemany(sql, chunk)
        finally:
            cursor.close()

    paramstyle_mark: ClassVar[str] = "?"

    def reset_sequences(self, conn: sa.Connection, tables: Sequence[sa.Table]) -> None:
        """Move each table's id generator past the restored ids."""

    def native_restore(self, conn_url: URL, dump: Path, entry: NativeEntry, *, force: bool) -> None:
        """Load a native dump into the target (which is empty, or ``force``)."""
        raise NotImplementedError
