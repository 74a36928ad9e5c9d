"""What differs between database engines, one module each: the URL's driver, the
pool and connection defaults, the per-connection setup, and which driver errors
mean "the database is unavailable" or "the statement timed out".

Adding an engine means adding one module with a :class:`~.base.Backend` subclass
and one entry in :data:`BACKENDS`.
"""

from __future__ import annotations

import importlib.util
import re

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from meshgate.data._engines.base import Backend, ErrorClass, Settings
from meshgate.data._engines.mysql import MariaDB, MySQL
from meshgate.data._engines.postgresql import PostgreSQL
from meshgate.data._engines.sqlite import SQLite
from meshgate.errors import ConfigError, ConfigIssue

__all__ = ["BACKENDS", "Backend", "ErrorClass", "Settings", "mask_url", "parse_url"]

EXAMPLES = (
    "sqlite:///path/to/service.db, postgresql://user:password@host:5432/dbname "
    "or mysql://user:password@host:3306/dbname"
)

BACKENDS: dict[str, type[Backend]] = {
    "sqlite": SQLite,
    "postgresql": PostgreSQL,
    "postgres": PostgreSQL,  # Heroku-style URLs
    "mysql": MySQL,
    "mariadb": MariaDB,
}
"""Backends by URL scheme (without the ``+driver`` part)."""

_PASSWORD_RE = re.compile(r"(//[^/@:]*:)[^/@]*@")


def mask_url(url: str | URL) -> str:
    """The URL with its password replaced by ``***``: safe for logs and error messages."""
    if isinstance(url, URL):
        return url.render_as_string(hide_password=True)
    return _PASSWORD_RE.sub(r"\1***@", url)


def parse_url(url: str, settings: Settings) -> Backend:
    """The backend for ``url``, with the URL's driver made explicit.

    Raises :class:`~meshgate.errors.ConfigError` naming the problem and the fix: an
    unparsable URL, an unknown scheme, a synchronous or unknown driver, a driver that
    is not installed, or settings the engine cannot honour.
    """
    source = f"database {settings.name!r}"
    shown = mask_url(url) if isinstance(url, str) else repr(url)
    if not isinstance(url, str) or "://" not in url:
        raise ConfigError(
            [ConfigIssue("url", f"{shown} is not a database URL; use {EXAMPLES}")], source
        )
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as exc:
        raise ConfigError(
            [ConfigIssue("url", f"cannot parse {shown} ({exc}); use {EXAMPLES}")], source
        ) from None
    scheme, _, driver = parsed.drivername.partition("+")
    backend_cls = BACKENDS.get(scheme)
    if backend_cls is None:
        raise ConfigError(
            [
                ConfigIssue(
                    "url",
                    f"unsupported database {scheme!r} in {shown}; meshgate supports "
                    f"SQLite, PostgreSQL and MySQL/MariaDB: use {EXAMPLES}",
                )
            ],
            source,
        )
    driver = driver or backend_cls.default_driver
    if driver not in backend_cls.drivers:
        known = ", ".join(f"{scheme}+{d}" for d in backend_cls.drivers)
        raise ConfigError(
            [
                ConfigIssue(
                    "url",
                    f"driver {driver!r} in {shown} is not an asyncio driver meshgate "
                    f"supports; use {scheme}:// (or {known})",
                )
            ],
            source,
        )
    module = backend_cls.drivers[driver]
    if importlib.util.find_spec(module) is None:
        raise ConfigError(
            [
                ConfigIssue(
                    "url",
                    f"{scheme}:// needs the {module} driver, which is not installed: "
                    f"pip install 'meshgate[{backend_cls.extra}]'",
                )
            ],
            source,
        )
    dialect = backend_cls.name
    backend = backend_cls(parsed.set(drivername=f"{dialect}+{driver}"), settings)
    issues = backend.check()
    if issues:
        raise ConfigError(issues, source)
    return backend
