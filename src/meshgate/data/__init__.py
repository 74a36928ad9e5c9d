"""The data layer: a service's database (SQLAlchemy 2 async on SQLite, PostgreSQL or
MySQL/MariaDB), its migrations (Alembic, see :mod:`meshgate.data.migrations`), and a
cache (in memory or Redis).

Reference: docs/data.md.
"""

from meshgate.data.cache import Cache
from meshgate.data.database import Database
from meshgate.data.errors import (
    CacheUnavailableError,
    DatabaseFileGoneError,
    DatabaseUnavailableError,
    DataError,
    MigrationError,
    StatementTimeoutError,
    UnmigratedDatabaseError,
)

__all__ = [
    "Cache",
    "CacheUnavailableError",
    "DataError",
    "Database",
    "DatabaseFileGoneError",
    "DatabaseUnavailableError",
    "MigrationError",
    "StatementTimeoutError",
    "UnmigratedDatabaseError",
]
