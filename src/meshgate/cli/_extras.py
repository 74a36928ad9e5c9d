"""One-line messages for what a command cannot do as installed: an optional
dependency that is missing (naming the pip extra that brings it), or a
configuration error with a single problem.

A plain ``pip install meshgate`` runs the embedded defaults (SQLite, the in-memory
cache and registry); Redis, PostgreSQL and MySQL/MariaDB need their extra.
"""

from __future__ import annotations

from meshgate.errors import ConfigError, MeshgateError

__all__ = ["EXTRAS", "missing_extra", "one_line"]

EXTRAS = {
    "redis": "redis",
    "asyncpg": "postgres",
    "psycopg": "postgres",
    "psycopg_binary": "postgres",
    "asyncmy": "mysql",
    "pymysql": "mysql",
}
"""The optional modules, each with the extra that installs it."""

_HINT = "pip install 'meshgate["


def missing_extra(exc: BaseException) -> str | None:
    """The message for ``exc`` if it (or what caused it) is the import of a missing
    optional dependency: what is missing and the ``pip install`` line; else None."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ModuleNotFoundError) and current.name:
            top = current.name.partition(".")[0]
            extra = EXTRAS.get(top)
            if extra is not None:
                return (
                    f"the {top} package is needed but not installed: "
                    f"pip install 'meshgate[{extra}]'"
                )
        if isinstance(current, ImportError | MeshgateError) and _HINT in str(current):
            return one_line(current)
        current = current.__cause__ or current.__context__
    return None


def one_line(exc: BaseException) -> str:
    """``exc`` as one line when it can be said in one: a configuration error with a
    single problem becomes ``source: field: problem``."""
    if isinstance(exc, ConfigError) and len(exc.issues) == 1:
        issue = str(exc.issues[0])
        return f"{exc.source}: {issue}" if exc.source else issue
    return str(exc)
