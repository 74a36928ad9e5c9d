"""The errors of the data layer, rooted at :class:`DataError` (itself a
:class:`~meshgate.errors.MeshgateError`).

A bad database or cache URL, or a bad argument, is a
:class:`~meshgate.errors.ConfigError` naming the argument and the fix. The types
here are runtime failures. Each one carries :attr:`DataError.status`, the HTTP
status a service should answer with when the error reaches its boundary.
"""

from __future__ import annotations

from meshgate.errors import MeshgateError

__all__ = [
    "CacheUnavailableError",
    "DataError",
    "DatabaseFileGoneError",
    "DatabaseUnavailableError",
    "MigrationError",
    "StatementTimeoutError",
    "UnmigratedDatabaseError",
]


class DataError(MeshgateError):
    """A database, cache or migration operation failed."""

    status: int = 500
    """The HTTP status a service should answer with."""


class DatabaseUnavailableError(DataError):
    """The database cannot be reached, was lost mid-use, or has no connection free (503).

    Retry later: new sessions reconnect by themselves once the database is back.
    """

    status = 503


class DatabaseFileGoneError(DatabaseUnavailableError):
    """The SQLite file the database opened was deleted or replaced while in use (503).

    Its open connections still reach the old file, where nothing written survives
    them: restore the file, or restart the service (which then finds a database to
    migrate)."""


class UnmigratedDatabaseError(DataError):
    """The database is not at the schema revision of the service's migrations: never
    migrated (or deleted, or replaced), behind them, or ahead of them (503)."""

    status = 503


class StatementTimeoutError(DataError):
    """A statement ran longer than the database's ``statement_timeout`` and was cancelled (503)."""

    status = 503


class CacheUnavailableError(DataError):
    """The cache backend (Redis) cannot be reached or answered with an error (503)."""

    status = 503


class MigrationError(DataError):
    """A migration command failed: unknown revision, missing folder, lock not acquired, or a
    revision's own error."""
