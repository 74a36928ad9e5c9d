"""SQLite through aiosqlite: the embedded default.

SQLite lets one writer at a time change a database. meshgate gives it one pooled
connection by default (``pool_size=1``), so that concurrent transactions of a
service queue for the connection, bounded by ``pool_timeout``, instead of failing
with "database is locked". Each connection runs in WAL mode (readers do not block
the writer), with ``synchronous=NORMAL`` (durable at checkpoints, safe from
corruption), foreign keys enforced, and a busy timeout for writers of other
processes. SQLAlchemy emits ``BEGIN`` itself, so that reads are transactional too
(the sqlite3 module's legacy mode would start transactions only before writes).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import AsyncAdaptedQueuePool

from meshgate.data._engines.base import Backend, ErrorClass
from meshgate.errors import ConfigIssue

__all__ = ["BEGIN_OPTION", "BUSY_TIMEOUT", "SQLite"]

BUSY_TIMEOUT = 5.0
"""Seconds a writer waits for another process's write lock before "database is locked"."""

BEGIN_OPTION = "meshgate_sqlite_begin"
"""Execution option naming how a transaction starts: ``DEFERRED`` (the default) or
``IMMEDIATE`` (take the write lock at once, as migrations do)."""

_INTERRUPT = "meshgate.interrupt"


class SQLite(Backend):
    name = "sqlite"
    drivers: ClassVar[Mapping[str, str]] = {"aiosqlite": "aiosqlite"}
    default_driver = "aiosqlite"
    extra = "sql"

    @property
    def memory(self) -> bool:
        """Whether the database lives in memory (one connection, gone when it closes)."""
        database = self.url.database
        return database in (None, "", ":memory:") or self.url.query.get("mode") == "memory"

    def file(self) -> Path | None:
        if self.memory or self.url.database is None:
            return None
        # Absolute now: SQLite resolves a relative path against the working directory
        # of each connect.
        return Path(self.url.database).expanduser().absolute()

    def check(self) -> list[ConfigIssue]:
        issues = []
        s = self.settings
        if self.url.host:
            issues.append(
                ConfigIssue(
                    "url",
                    f"a SQLite URL has no host, found {self.url.host!r}: use "
                    "sqlite:///relative/path.db or sqlite:////absolute/path.db",
                )
            )
        if self.memory:
            if s.pool_size not in (None, 1) or s.max_overflow not in (None, 0):
                issues.append(
                    ConfigIssue(
                        "pool_size",
                        "an in-memory SQLite database lives in one connection: leave "
                        "pool_size and max_overflow unset, or use a file "
                        "(sqlite:///path.db)",
                    )
                )
        elif self.url.database is not None:
            parent = Path(self.url.database).expanduser().absolute().parent
            if not parent.is_dir():
                issues.append(
                    ConfigIssue(
                        "url",
                        f"the directory of the SQLite file, {parent}, does not exist: create "
                        "it, or fix the path (sqlite:///relative.db is relative to the "
                        "working directory, sqlite:////absolute.db is absolute)",
                    )
                )
        return issues

    def engine_options(self) -> dict[str, Any]:
        s = self.settings
        return {
            "poolclass": AsyncAdaptedQueuePool,
            "pool_size": 1 if s.pool_size is None else s.pool_size,
            "max_overflow": 0 if s.max_overflow is None else s.max_overflow,
            "pool_timeout": s.pool_timeout,
            # A local file: connections do not go stale, and an in-memory database
            # must keep its one connection for ever.
            "pool_recycle": -1 if s.pool_recycle is None else s.pool_recycle,
            "pool_pre_ping": False,
            "connect_args": {"timeout": BUSY_TIMEOUT, **s.connect_args},
        }

    def install(self, engine: Engine) -> None:
        wal = not self.memory
        busy_ms = round(BUSY_TIMEOUT * 1000)

        @event.listens_for(engine, "connect")
        def _connect(dbapi_connection: Any, _record: Any) -> None:
            # Outside any transaction: PRAGMA foreign_keys is ignored inside one.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            try:
                if wal:
                    cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute("PRAGMA synchronous=NORMAL")
                cursor.execute("PRAGMA foreign_keys=ON")
                cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
            finally:
                cursor.close()

        @event.listens_for(engine, "begin")
        def _begin(conn: Connection) -> None:
            mode = conn.get_execution_options().get(BEGIN_OPTION, "DEFERRED")
            conn.exec_driver_sql("BEGIN" if mode == "DEFERRED" else f"BEGIN {mode}")

        timeout = self.settings.statement_timeout
        if timeout is not None:
            self._install_timeout(engine, timeout)

    @staticmethod
    def _install_timeout(engine: Engine, timeout: float) -> None:
        """Interrupt a statement running longer than ``timeout`` (SQLite has no such setting).

        The timer and the end-of-statement hook both run on the event loop's thread, so a
        timer that fires after the statement ended finds no statement running, and
        sqlite3_interrupt() is then a no-op: it never hits the next statement.
        """

        @event.listens_for(engine, "before_cursor_execute")
        def _arm(conn: Connection, *_args: Any) -> None:
            driver = conn.connection.driver_connection
            raw = getattr(driver, "_conn", None)  # the sqlite3 connection in aiosqlite's thread
            if isinstance(raw, sqlite3.Connection):
                loop = asyncio.get_running_loop()
                conn.info[_INTERRUPT] = loop.call_later(timeout, raw.interrupt)

        def _disarm(conn: Connection | None) -> None:
            if conn is not None:
                handle = conn.info.pop(_INTERRUPT, None)
                if handle is not None:
                    handle.cancel()

        @event.listens_for(engine, "after_cursor_execute")
        def _after(conn: Connection, *_args: Any) -> None:
            _disarm(conn)

        @event.listens_for(engine, "handle_error")
        def _error(context: Any) -> None:
            _disarm(context.connection)

    def classify(self, error: BaseException) -> ErrorClass | None:
        if isinstance(error, sqlite3.OperationalError):
            message = str(error).lower()
            if message == "interrupted":
                return "timeout"
            if (
                "database is locked" in message
                or "unable to open database" in message
                or "disk i/o error" in message
            ):
                return "unavailable"
            if message.startswith(("no such table", "no such column")):
                return "schema"
        return None
