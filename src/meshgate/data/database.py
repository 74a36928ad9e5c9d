"""A service's database: SQLAlchemy 2 async engine, sessions, health, metrics.

One :class:`Database` per database a service uses, made at startup and closed at
shutdown. The engine defaults depend on the URL (see the ``_engines`` modules and
docs/data.md); errors that mean "the database is not there right now" become
:class:`~meshgate.data.errors.DatabaseUnavailableError` whatever the driver, so a
service maps one type to 503.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from functools import lru_cache
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from prometheus_client import CollectorRegistry
from sqlalchemy import MetaData, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, Dialect, ExceptionContext
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import QueuePool

from meshgate.data._engines import Backend, ErrorClass, Settings, mask_url, parse_url
from meshgate.data._metrics import PoolStats, database_metrics
from meshgate.data.errors import (
    DatabaseFileGoneError,
    DatabaseUnavailableError,
    DataError,
    StatementTimeoutError,
    UnmigratedDatabaseError,
)
from meshgate.errors import ConfigError, ConfigIssue

__all__ = ["STATEMENT_KINDS", "Database", "statement_kind"]

log = logging.getLogger("meshgate.data")

STATEMENT_KINDS = ("select", "insert", "update", "delete", "other")
"""The values of the ``kind`` label of the query metrics."""

_SQL_LEN = 2000
"""Characters of a slow statement's text that go to the log."""

_T0 = "meshgate.t0"
_LEADING_RE = re.compile(r"\s+|--[^\n]*\n?|/\*.*?\*/|\(", re.DOTALL)
_WORD_RE = re.compile(r"[A-Za-z]+")
_CTE_BODY_RE = re.compile(r"\)\s*(select|insert|update|delete)\b", re.IGNORECASE)
_ALIASES = {"replace": "insert", "upsert": "insert"}


@lru_cache(maxsize=1024)
def statement_kind(sql: str) -> str:
    """The kind of a SQL statement for metrics: select, insert, update, delete or other.

    Leading comments and parentheses are skipped; a ``WITH`` statement is the kind
    of its main statement (the first one after a closing parenthesis).
    """
    pos = 0
    while True:
        found = _LEADING_RE.match(sql, pos)
        if found is None or found.end() == pos:
            break
        pos = found.end()
    word_match = _WORD_RE.match(sql, pos)
    if word_match is None:
        return "other"
    word = word_match.group().lower()
    word = _ALIASES.get(word, word)
    if word == "with":
        body = _CTE_BODY_RE.search(sql, word_match.end())
        return body.group(1).lower() if body else "other"
    return word if word in STATEMENT_KINDS else "other"


def _one_line(sql: str) -> str:
    text = " ".join(sql.split())
    return text if len(text) <= _SQL_LEN else text[:_SQL_LEN] + "..."


class Database:
    """A database of a service: an async engine with defaults for its kind, sessions
    that commit or roll back, a ping for readiness, and metrics.

    ``url`` is ``sqlite:///path.db`` (the default engine, embedded), ``sqlite://`` (in
    memory), ``postgresql://user:password@host:5432/db`` or
    ``mysql://user:password@host:3306/db`` (``mariadb://`` too); the async driver is
    chosen for you. Pool settings left at None take the engine's default (docs/data.md).

    ``migrations`` is the folder of the service's migrations: :meth:`check` (its
    readiness) then also fails unless the database is at their head revision, so that
    a database that was never migrated, lost, or replaced is named as such instead of
    answering "no such table" to requests. A SQLite file is watched in any case: once
    deleted or replaced while in use, :meth:`check` and new sessions fail with
    :class:`~meshgate.data.errors.DatabaseFileGoneError` (nothing written to the old
    file would be kept).

    Nothing connects until first use. Raises :class:`~meshgate.errors.ConfigError`
    for a bad URL or setting, naming it and the fix.
    """

    def __init__(
        self,
        url: str,
        *,
        pool_size: int | None = None,
        max_overflow: int | None = None,
        pool_timeout: float = 10.0,
        pool_recycle: float | None = None,
        statement_timeout: float | None = None,
        connect_timeout: float = 5.0,
        slow_query: float | None = 0.2,
        echo: bool = False,
        name: str = "default",
        registry: CollectorRegistry | None = None,
        connect_args: Mapping[str, Any] | None = None,
        migrations: str | Path | None = None,
        version_table: str = "alembic_version",
    ) -> None:
        _check_settings(
            name,
            pool_size=pool_size,
            max_overflow=max_overflow,
            pool_timeout=pool_timeout,
            pool_recycle=pool_recycle,
            statement_timeout=statement_timeout,
            connect_timeout=connect_timeout,
            slow_query=slow_query,
        )
        settings = Settings(
            name=name,
            pool_size=pool_size,
            max_overflow=max_overflow,
            pool_timeout=pool_timeout,
            pool_recycle=pool_recycle,
            statement_timeout=statement_timeout,
            connect_timeout=connect_timeout,
            connect_args=dict(connect_args or {}),
        )
        self._backend: Backend = parse_url(url, settings)
        self.name = name
        """The ``database`` label of this database's metrics and the name in its errors."""
        self.url = mask_url(self._backend.url)
        """The URL with the driver made explicit and the password masked."""
        self.slow_query = slow_query
        """Statements slower than this many seconds are logged; None: never."""
        self.migrations = Path(migrations) if migrations is not None else None
        """The folder of the migrations the database must be at the head of; None: any."""
        self.version_table = version_table
        """The table where the database records its revision."""
        self.file = self._backend.file()
        """The SQLite file (absolute), or None (a server, or SQLite in memory)."""
        self._identity: tuple[int, int] | None = None  # the file's (device, inode) once open
        self._expected: tuple[str, ...] | None = None  # the head revisions, read once
        # Parameters stay out of logs and exception texts: they may hold secrets or PII.
        self.engine: AsyncEngine = create_async_engine(
            self._backend.url,
            echo=echo,
            hide_parameters=True,
            **self._backend.engine_options(),
        )
        """The SQLAlchemy engine, for what sessions do not cover."""
        self._sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        self._metrics = database_metrics(registry)
        self._observe = {
            kind: self._metrics.query_duration.labels(name, kind).observe
            for kind in STATEMENT_KINDS
        }
        self._slow = {
            kind: self._metrics.slow_queries.labels(name, kind) for kind in STATEMENT_KINDS
        }
        self._install(self.engine.sync_engine)
        self._metrics.pools.databases.add(self)
        self._closed = False

    # -- lifecycle

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close every pooled connection; sessions still open finish on their own
        connection. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._metrics.pools.databases.discard(self)
        await self.engine.dispose()

    def __repr__(self) -> str:
        return f"Database({self.url!r}, name={self.name!r})"

    # -- use

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        """An ORM session in a transaction: committed when the block ends, rolled back
        when it raises (the exception then propagates).

        Objects stay usable after the commit (``expire_on_commit=False``): nothing is
        loaded lazily behind your back. Raises
        :class:`~meshgate.data.errors.DatabaseUnavailableError` when the database
        cannot be reached, is lost mid-use, or no pooled connection frees up within
        ``pool_timeout``; :class:`~meshgate.data.errors.StatementTimeoutError` when a
        statement exceeds ``statement_timeout``.
        """
        self._verify_file()
        session = self._sessions()
        try:
            try:
                yield session
                await session.commit()
            except BaseException:
                await self._rollback(session)
                raise
            finally:
                await session.close()
        except sa_exc.TimeoutError as exc:
            raise self._pool_exhausted() from exc
        except sa_exc.DBAPIError as exc:
            translated = self._schema_error(exc)
            if translated is None:
                raise
            raise translated from exc

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[AsyncConnection]:
        """A Core connection in a transaction, committed when the block ends and rolled
        back when it raises; errors as for :meth:`session`."""
        self._verify_file()
        try:
            async with self.engine.begin() as conn:
                yield conn
        except sa_exc.TimeoutError as exc:
            raise self._pool_exhausted() from exc
        except sa_exc.DBAPIError as exc:
            translated = self._schema_error(exc)
            if translated is None:
                raise
            raise translated from exc

    def _schema_error(self, exc: sa_exc.DBAPIError) -> UnmigratedDatabaseError | None:
        """For a database with migrations, a statement that found no table or column:
        the schema is not theirs. Translated here, where it leaves the caller's block,
        not in ``handle_error``: SQLAlchemy's own probes (MySQL's ``has_table``) catch
        that error and must still get it."""
        if (
            self.migrations is None
            or exc.orig is None
            or self._backend.classify(exc.orig) != "schema"
        ):
            return None
        self._metrics.errors.labels(self.name, "schema").inc()
        return UnmigratedDatabaseError(
            f"database {self.name!r} ({self.url}) lacks what a statement needs "
            f"({exc.orig}): it is not at the schema of the migrations in {self.migrations} "
            "(lost, replaced, or never migrated?); migrate it: `meshgate db upgrade SERVICE`"
        )

    async def check(self, timeout: float = 2.0) -> dict[str, str]:
        """Check that the database answers and is the one expected; for readiness.

        Runs ``SELECT 1``; then checks that a SQLite file is still the one opened, and,
        with ``migrations``, that the database is at their head revision. Returns what
        was found (``{"revision": ...}`` with ``migrations``).

        Raises:
            DatabaseUnavailableError: no answer within ``timeout`` seconds, or an error.
            DatabaseFileGoneError: the SQLite file was deleted or replaced.
            UnmigratedDatabaseError: not at the migrations' head, saying where it is.
        """
        where = f"database {self.name!r} ({self.url})"
        try:
            async with asyncio.timeout(timeout), self.engine.connect() as conn:
                await conn.exec_driver_sql("SELECT 1")
                self._verify_file()
                if self.migrations is None:
                    return {}
                revision = await conn.run_sync(self._verify_revision)
                return {"revision": revision or "base"}
        except DataError:
            raise
        except TimeoutError as exc:
            raise DatabaseUnavailableError(
                f"{where} did not answer SELECT 1 within {timeout:g} s"
            ) from exc
        except sa_exc.TimeoutError as exc:
            raise self._pool_exhausted() from exc
        except sa_exc.DBAPIError as exc:
            raise DatabaseUnavailableError(f"{where} failed SELECT 1: {exc.orig}") from exc

    def _verify_revision(self, conn: Connection) -> str | None:
        from meshgate.data import migrations  # noqa: PLC0415 - it imports this module

        assert self.migrations is not None  # noqa: S101 - checked by the caller
        if self._expected is None:
            self._expected = migrations.heads(self.migrations)
        return migrations.verify_revision(
            conn,
            self.migrations,
            self._expected,
            version_table=self.version_table,
            where=f"database {self.name!r} ({self.url})",
        )

    def _verify_file(self) -> None:
        """Raise when the SQLite file is no longer the one the connections opened."""
        if self._identity is None or self.file is None:
            return
        try:
            stat = os.stat(self.file)
        except FileNotFoundError:
            what = "was deleted"
        else:
            if (stat.st_dev, stat.st_ino) == self._identity:
                return
            what = "was replaced by another file"
        self._metrics.errors.labels(self.name, "unavailable").inc()
        raise DatabaseFileGoneError(
            f"database {self.name!r}: its SQLite file {self.file} {what} while the service "
            "had it open; what is written now would be lost with the old file. Restore the "
            "file, or restart the service to use a new one (it must be migrated: meshgate "
            "up does it for services with migrate: true)"
        )

    def _opened(self, _dbapi_connection: Any, _record: Any) -> None:
        # The first connection pins the file: later ones must find the same one.
        if self._identity is None and self.file is not None:
            try:
                stat = os.stat(self.file)
            except OSError:
                return
            self._identity = (stat.st_dev, stat.st_ino)

    async def ping(self, timeout: float = 2.0) -> bool:
        """Whether the database answers ``SELECT 1`` within ``timeout`` seconds; for
        readiness checks. Never raises for an unavailable database (see :meth:`check`
        for the reason)."""
        try:
            await self.check(timeout)
        except DataError as exc:
            log.debug("ping failed: %s", exc)
            return False
        return True

    async def create_all(self, metadata: MetaData) -> None:
        """Create the tables of ``metadata`` that do not exist yet (tests and
        development; services use migrations)."""
        async with self.connection() as conn:
            await conn.run_sync(metadata.create_all)

    async def drop_all(self, metadata: MetaData) -> None:
        """Drop the tables of ``metadata`` that exist (tests and development)."""
        async with self.connection() as conn:
            await conn.run_sync(metadata.drop_all)

    def pool_stats(self) -> PoolStats:
        """The connection pool's numbers now (what the pool gauges report)."""
        pool = self.engine.pool
        if isinstance(pool, QueuePool):
            return PoolStats(
                size=pool.size(),
                checked_out=pool.checkedout(),
                idle=pool.checkedin(),
                overflow=max(0, pool.overflow()),
            )
        return PoolStats(0, 0, 0, 0)  # pragma: no cover - meshgate always pools

    # -- internals

    def _pool_exhausted(self) -> DatabaseUnavailableError:
        stats = self.pool_stats()
        return DatabaseUnavailableError(
            f"database {self.name!r}: no pooled connection became free within "
            f"pool_timeout ({self._backend.settings.pool_timeout:g} s; "
            f"{stats.checked_out} in use): raise pool_size or max_overflow, or hold "
            "sessions for less time"
        )

    async def _rollback(self, session: AsyncSession) -> None:
        try:
            await session.rollback()
        except Exception as exc:  # noqa: BLE001 - the original error is the one to raise
            log.debug("rollback after an error failed on database %r: %s", self.name, exc)

    def _install(self, engine: Any) -> None:
        self._backend.install(engine)
        event.listen(engine, "do_connect", self._do_connect)
        event.listen(engine, "connect", self._opened)
        event.listen(engine, "handle_error", self._handle_error)
        event.listen(engine, "before_cursor_execute", self._before)
        event.listen(engine, "after_cursor_execute", self._after)

    def _do_connect(
        self, dialect: Dialect, _record: Any, cargs: Any, cparams: dict[str, Any]
    ) -> Any:
        # Some drivers (asyncpg) raise plain OSError for refused or timed-out
        # connections, which SQLAlchemy passes on untranslated.
        try:
            return dialect.connect(*cargs, **cparams)
        except OSError as exc:
            self._metrics.errors.labels(self.name, "unavailable").inc()
            reason = (
                "timed out" if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
            )
            raise DatabaseUnavailableError(
                f"database {self.name!r} ({self.url}): cannot connect: {reason}"
            ) from exc

    def _classify(self, context: ExceptionContext) -> ErrorClass | None:
        error = context.original_exception
        kind = self._backend.classify(error)
        if kind is None and (
            context.is_disconnect
            or (context.connection is None and context.statement is None)  # while connecting
        ):
            kind = "unavailable"
        return kind

    def _handle_error(self, context: ExceptionContext) -> BaseException | None:
        if context.is_pre_ping:
            return None  # the pool replaces the connection; nothing reaches the caller
        kind = self._classify(context)
        error = context.original_exception
        if kind == "schema":
            return None  # counted and translated by _schema_error, if at all
        if kind is None:
            label = (
                "integrity"
                if isinstance(context.sqlalchemy_exception, sa_exc.IntegrityError)
                else "other"
            )
            self._metrics.errors.labels(self.name, label).inc()
            return None
        self._metrics.errors.labels(self.name, kind).inc()
        where = f"database {self.name!r} ({self.url})"
        if kind == "timeout":
            limit = self._backend.settings.statement_timeout
            within = f" (statement_timeout {limit:g} s)" if limit is not None else ""
            return StatementTimeoutError(f"{where}: statement cancelled{within}: {error}")
        what = "cannot connect" if context.connection is None else "connection lost or refused"
        return DatabaseUnavailableError(f"{where}: {what}: {error}")

    def _before(self, conn: Connection, *_args: Any) -> None:
        conn.info[_T0] = time.perf_counter()

    def _after(
        self,
        conn: Connection,
        _cursor: Any,
        statement: str,
        _parameters: Any,
        _context: Any,
        _executemany: bool,
    ) -> None:
        t0 = conn.info.pop(_T0, None)
        if t0 is None:
            return
        elapsed = time.perf_counter() - t0
        kind = statement_kind(statement)
        self._observe[kind](elapsed)
        slow = self.slow_query
        if slow is not None and elapsed >= slow:
            self._slow[kind].inc()
            # The statement's text only: parameter values never reach the log.
            log.warning(
                "slow query on database %r: %.3f s (slow_query %g s): %s",
                self.name,
                elapsed,
                slow,
                _one_line(statement),
                extra={"database": self.name, "duration": elapsed, "statement_kind": kind},
            )


def _check_settings(name: str, **values: float | None) -> None:
    issues = []
    rules: dict[str, tuple[Callable[[float], bool], str]] = {
        "pool_size": (lambda v: v >= 1 and float(v).is_integer(), "an integer of at least 1"),
        "max_overflow": (lambda v: v >= 0 and float(v).is_integer(), "an integer of at least 0"),
        "pool_timeout": (lambda v: v > 0, "a number of seconds above 0"),
        "pool_recycle": (lambda v: v > 0, "a number of seconds above 0"),
        "statement_timeout": (lambda v: v > 0, "a number of seconds above 0, or None for none"),
        "connect_timeout": (lambda v: v > 0, "a number of seconds above 0"),
        "slow_query": (lambda v: v >= 0, "a number of seconds, 0 or more, or None to log none"),
    }
    for field, value in values.items():
        if value is None:
            continue
        ok, want = rules[field]
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or math.isnan(value)
            or not ok(value)
        ):
            issues.append(ConfigIssue(field, f"got {value!r}; expected {want}"))
    if issues:
        raise ConfigError(issues, f"database {name!r}")
