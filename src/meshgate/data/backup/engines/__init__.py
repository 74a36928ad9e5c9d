"""What differs between engines for backup and restore, one module each (see
:class:`~meshgate.data.backup.engines.base.Engine`), and :func:`open_engine`, which
picks one for a service's database URL.

Adding an engine means adding one module and one entry in :data:`ENGINES`.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from meshgate.data._engines import mask_url
from meshgate.data.backup.engines.base import Engine
from meshgate.data.backup.engines.mysql import MySQL
from meshgate.data.backup.engines.postgresql import PostgreSQL
from meshgate.data.backup.engines.sqlite import SQLite
from meshgate.errors import ConfigError, ConfigIssue

if TYPE_CHECKING:
    from meshgate.data import Database

__all__ = ["ENGINES", "Engine", "open_engine", "url_of"]

ENGINES: dict[str, type[Engine]] = {
    "sqlite": SQLite,
    "postgresql": PostgreSQL,
    "postgres": PostgreSQL,
    "mysql": MySQL,
    "mariadb": MySQL,
}
"""Engines by URL scheme (without the ``+driver`` part)."""

_SYNC_DIALECT = {"sqlite": "sqlite", "postgresql": "postgresql+psycopg", "mysql": "mysql+pymysql"}


def url_of(database: str | Database) -> str:
    """The URL of a :class:`~meshgate.data.Database`, password included, or the string."""
    if isinstance(database, str):
        return database
    return database._backend.url.render_as_string(hide_password=False)


def open_engine(database: str | Database) -> Engine:
    """The backup engine of a database URL (any driver in the URL is replaced by the
    synchronous one). Raises :class:`~meshgate.errors.ConfigError` for a URL that is
    not one, an in-memory SQLite database, or a driver that is not installed."""
    text = url_of(database)
    source = "database URL"
    try:
        url = make_url(text)
    except (ArgumentError, ValueError):
        raise ConfigError(
            [ConfigIssue("url", f"cannot parse {mask_url(text)} as a database URL")], source
        ) from None
    scheme = url.drivername.partition("+")[0]
    engine_cls = ENGINES.get(scheme)
    if engine_cls is None:
        raise ConfigError(
            [
                ConfigIssue(
                    "url",
                    f"backup supports SQLite, PostgreSQL and MariaDB/MySQL, not {scheme!r} "
                    f"({mask_url(url)})",
                )
            ],
            source,
        )
    if engine_cls is SQLite and url.database in (None, "", ":memory:"):
        raise ConfigError(
            [
                ConfigIssue(
                    "url",
                    "an in-memory SQLite database lives in its process and cannot be backed "
                    "up or restored from another: use a file (sqlite:///path.db)",
                )
            ],
            source,
        )
    if importlib.util.find_spec(engine_cls.driver) is None:
        raise ConfigError(
            [
                ConfigIssue(
                    "url",
                    f"backup and restore of {scheme} use the {engine_cls.driver} driver, which "
                    f"is not installed: pip install 'meshgate[{engine_cls.extra}]'",
                )
            ],
            source,
        )
    sync: URL = url.set(drivername=_SYNC_DIALECT[engine_cls.name])
    if engine_cls is MySQL and "charset" not in sync.query:
        sync = sync.update_query_dict({"charset": "utf8mb4"})
    return engine_cls(sync)
