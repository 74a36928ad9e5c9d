"""SQLite through the sqlite3 module.

The snapshot is a copy made with SQLite's online backup API in one step: it reads
the database inside one read transaction, so in WAL mode (meshgate's default) the
service's writers go on while it runs; in rollback-journal mode they wait for the
copy (a file copy's time). The rows are then read from the copy. The copy is also
the native dump: a native archive holds that database file.

Values are written as SQLAlchemy writes them on SQLite (timestamps as
``YYYY-MM-DD HH:MM:SS.ffffff`` text, booleans as 0/1, JSON as text), so that a
restored database reads back the same through the service's models.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL

from meshgate.data._engines.sqlite import BUSY_TIMEOUT
from meshgate.data.backup.codec import Converter
from meshgate.data.backup.engines.base import Engine, NativeDump, Snapshot
from meshgate.data.backup.errors import BackupError, IncompatibleArchiveError
from meshgate.data.backup.manifest import ColumnEntry, NativeEntry

__all__ = ["SQLite"]

_INTERNAL = ("sqlite_",)


def _datetime_text(value: datetime) -> str:
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return value.strftime("%Y-%m-%d %H:%M:%S.%f")


class SQLite(Engine):
    name = "sqlite"
    driver = "sqlite3"
    extra = "sql"

    @property
    def path(self) -> Path:
        return Path(self.url.database or "").expanduser().absolute()

    @property
    def database(self) -> str:
        return str(self.path)

    def setup(self, engine: sa.Engine) -> None:
        # The sqlite3 module would start transactions only before DML, and run DDL
        # outside them: let SQLAlchemy's BEGIN cover both, so a restore is atomic.
        @event.listens_for(engine, "connect")
        def _connect(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None
            dbapi_connection.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")

        @event.listens_for(engine, "begin")
        def _begin(conn: sa.Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE" if self._write else "BEGIN")

    _write = False

    def writer(self) -> SQLite:
        """This engine, for writing: transactions take the write lock at once."""
        copy = SQLite(self.url)
        copy._write = True
        return copy

    @contextmanager
    def snapshot(self, workdir: Path, *, native: bool = False) -> Iterator[Snapshot]:
        if not self.path.is_file():
            raise BackupError(
                f"no SQLite database at {self.path}: check the URL (sqlite:///relative.db is "
                "relative to the current directory, sqlite:////abs/path.db is absolute)"
            )
        copy = workdir / "snapshot.sqlite"
        with closing(sqlite3.connect(self.path, timeout=BUSY_TIMEOUT)) as source:
            journal = str(source.execute("PRAGMA journal_mode").fetchone()[0])
            taken = datetime.now(UTC)
            with closing(sqlite3.connect(copy)) as target:
                # pages=-1: one step, one read transaction, so the copy is consistent
                # (in steps, a write by another connection would restart it).
                source.backup(target, pages=-1)
                pages = int(target.execute("PRAGMA page_count").fetchone()[0])
        notes = []
        if journal.lower() != "wal":
            notes.append(
                f"the database is in {journal} journal mode: writers waited while it was "
                "copied (WAL mode lets them go on)"
            )
        engine = sa.create_engine(URL.create("sqlite", database=str(copy)), poolclass=sa.NullPool)
        try:
            with engine.connect() as conn:
                snapshot = Snapshot(
                    conn=conn,
                    taken_at=taken,
                    method="SQLite online backup API (one step) into a copy, read from the copy",
                    version=sqlite3.sqlite_version,
                    engine="sqlite",
                    position={"journal_mode": journal, "pages": pages},
                    notes=notes,
                )
                if native:
                    snapshot.native = lambda _folder: NativeDump(
                        path=copy,
                        entry=NativeEntry(
                            tool="sqlite3 backup API",
                            version=sqlite3.sqlite_version,
                            member="native/database.sqlite",
                            format="sqlite-database",
                        ),
                    )
                yield snapshot
        finally:
            engine.dispose()

    def tables(self, conn: sa.Connection) -> list[str]:
        rows = conn.exec_driver_sql(
            "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
        )
        return [str(r[0]) for r in rows if not str(r[0]).startswith(_INTERNAL)]

    def drop_all(self, conn: sa.Connection, tables: Sequence[str]) -> None:
        conn.exec_driver_sql("PRAGMA defer_foreign_keys = ON")
        views = conn.exec_driver_sql("SELECT name FROM sqlite_master WHERE type = 'view'").all()
        for (view,) in views:
            conn.exec_driver_sql(f"DROP VIEW IF EXISTS {self.quote(conn, str(view))}")
        for table in tables:
            conn.exec_driver_sql(f"DROP TABLE IF EXISTS {self.quote(conn, table)}")

    @contextmanager
    def loading(self, conn: sa.Connection) -> Iterator[None]:
        # Checked at commit, when foreign keys are on for the connection.
        conn.exec_driver_sql("PRAGMA defer_foreign_keys = ON")
        yield

    def binder(self, column: ColumnEntry) -> Converter | None:
        kind = column.type
        if kind == "datetime":
            return _datetime_text
        if kind == "date":
            return lambda v: v.isoformat()
        if kind == "time":
            return lambda v: v.strftime("%H:%M:%S.%f")
        if kind == "boolean":
            return int
        if kind == "decimal":
            return str  # NUMERIC affinity: SQLite stores it as it stores numbers
        if kind == "json":
            return lambda v: json.dumps(v, ensure_ascii=False)
        if kind == "uuid":
            return str
        return None

    def native_restore(self, conn_url: URL, dump: Path, entry: NativeEntry, *, force: bool) -> None:
        if entry.format != "sqlite-database":
            raise IncompatibleArchiveError(f"a {entry.format} dump cannot be restored into SQLite")
        target = Path(conn_url.database or "").expanduser().absolute()
        with (
            closing(sqlite3.connect(dump)) as source,
            closing(sqlite3.connect(target, timeout=BUSY_TIMEOUT)) as dest,
        ):
            # The backup API replaces the target's content in one transaction.
            source.backup(dest, pages=-1)
