"""The migrations of meshgate's event tables (Alembic), kept apart from the
service's own: their own folder inside meshgate and their own version table
(``<prefix>events_version``), so that a service's migrations never need to know
about them and both upgrade independently.

``meshgate db upgrade SERVICE`` runs them too when SERVICE uses events; call
:func:`upgrade` directly otherwise. Locking and transactions are those of
:mod:`meshgate.data.migrations` (several replicas starting at once migrate one
after the other).
"""

from __future__ import annotations

from pathlib import Path

from alembic.config import Config

from meshgate.data.database import Database
from meshgate.data.migrations import _config, _current, _migrate, _on_connection, _run
from meshgate.events.schema import DEFAULT_PREFIX, EventTables

__all__ = ["FOLDER", "PREFIX_ATTRIBUTE", "current", "downgrade", "upgrade"]

FOLDER = Path(__file__).with_name("alembic")
"""The Alembic folder of the event tables."""
PREFIX_ATTRIBUTE = "meshgate.events.prefix"
"""The Alembic config attribute that tells the revisions the table prefix."""


def _configured(prefix: str) -> tuple[Config, str]:
    tables = EventTables(prefix)  # checks the prefix
    config = _config(FOLDER, tables.version_table)
    config.attributes[PREFIX_ATTRIBUTE] = prefix
    return config, tables.version_table


def upgrade(
    database: str | Database, revision: str = "head", *, prefix: str = DEFAULT_PREFIX
) -> str | None:
    """Make (or bring up to date) the event tables in ``database``; returns the
    revision they are at.

    Raises:
        MigrationError: a revision failed, or another process holds the migration lock.
        DatabaseUnavailableError: the database cannot be reached.
    """
    config, _ = _configured(prefix)
    return _run(
        _on_connection(
            database,
            config,
            lambda conn: _migrate(conn, config, "upgrade", revision),
            lock_timeout=60.0,
        )
    )


def downgrade(
    database: str | Database, revision: str = "base", *, prefix: str = DEFAULT_PREFIX
) -> str | None:
    """Take the event tables back to ``revision`` (``base``: drop them)."""
    config, _ = _configured(prefix)
    return _run(
        _on_connection(
            database,
            config,
            lambda conn: _migrate(conn, config, "downgrade", revision),
            lock_timeout=60.0,
        )
    )


def current(database: str | Database, *, prefix: str = DEFAULT_PREFIX) -> str | None:
    """The revision the event tables are at (None before the first)."""
    config, _ = _configured(prefix)
    return _run(
        _on_connection(
            database,
            config,
            lambda conn: _current(conn, config),
            lock_timeout=None,
        )
    )
