"""A service's schema migrations, with Alembic.

Each service keeps its migrations in a folder of its own (``services/users/migrations``
by default, see docs/data.md), made by :func:`init`. The folder holds Alembic's
``env.py``, ``script.py.mako`` and ``versions/``; there is no ``alembic.ini``: the
database URL always comes from the caller (the CLI's ``--database-url`` or
``MESHGATE_DATABASE_URL``, or the argument of these functions), never from a file
in the repository.

The functions are synchronous, as Alembic is, and block while they run. They open
their own async engine (the same drivers and defaults as
:class:`~meshgate.data.Database`) on an event loop of their own, in a worker thread
when the calling thread already runs one; from async code prefer
``await asyncio.to_thread(upgrade, url, folder)``.

Upgrades and downgrades take a lock first, so that several replicas starting at once
migrate one after the other (the others then find nothing to do): an advisory lock on
PostgreSQL, ``GET_LOCK`` on MySQL/MariaDB, ``BEGIN IMMEDIATE`` on SQLite. On
PostgreSQL and SQLite the whole run is one transaction: a failing revision leaves
the schema as it was. MySQL/MariaDB commit every DDL statement by themselves, so a
failing revision there may leave part of its changes behind.

Failures raise :class:`~meshgate.data.errors.MigrationError` (unknown revision,
missing folder, lock not acquired, a database ahead of the scripts, a revision's own
error) or :class:`~meshgate.data.errors.DatabaseUnavailableError`.

:func:`heads` and :func:`verify_revision` are what a :class:`~meshgate.data.Database`
given its ``migrations`` checks readiness with: the database must be at the head of
the scripts.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import zlib
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import Script, ScriptDirectory
from alembic.script.revision import RevisionError
from alembic.util.exc import CommandError
from prometheus_client import CollectorRegistry
from sqlalchemy import MetaData, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection

from meshgate.data._engines.sqlite import BEGIN_OPTION
from meshgate.data.database import Database
from meshgate.data.errors import DataError, MigrationError, UnmigratedDatabaseError
from meshgate.data.types import UTCDateTime

__all__ = [
    "ENV_TEMPLATE",
    "VERSION_TABLE",
    "Revision",
    "current",
    "downgrade",
    "heads",
    "history",
    "init",
    "revision",
    "run_env",
    "upgrade",
    "verify_revision",
]

T = TypeVar("T")

VERSION_TABLE = "alembic_version"
"""The default table where a database records its revision."""

LOCK_TIMEOUT = 60.0
"""Seconds an upgrade or downgrade waits for another process's migration to finish."""

_LOCK_POLL = 0.1
_CONNECTION = "meshgate.connection"
_METADATA = "meshgate.metadata"
_VERSION_TABLE = "meshgate.version_table"

ENV_TEMPLATE = '''\
"""The Alembic environment of this service's migrations (written by `meshgate db init`).

meshgate runs it on a connection it opened to the database the caller named
(`meshgate db upgrade SERVICE --database-url URL`, MESHGATE_DATABASE_URL, or
meshgate.data.migrations.upgrade(url, folder)); no URL is kept here.

For `meshgate db revision SERVICE -m MESSAGE --autogenerate`, set target_metadata
to the metadata of your models (or expose `metadata` from the service's module).
Autogenerate leaves alone the tables your metadata does not name.
"""

from alembic import context

from meshgate.data.migrations import run_env

# from myservice.models import Base
# target_metadata = Base.metadata
target_metadata = None

run_env(context, target_metadata)
'''
"""The ``env.py`` that :func:`init` writes."""

_SCRIPT_TEMPLATE = '''\
"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
Create Date: ${create_date}
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
${imports if imports else ""}

revision: str = ${repr(up_revision)}
down_revision: str | Sequence[str] | None = ${repr(down_revision)}
branch_labels: str | Sequence[str] | None = ${repr(branch_labels)}
depends_on: str | Sequence[str] | None = ${repr(depends_on)}


def upgrade() -> None:
    ${upgrades if upgrades else "pass"}


def downgrade() -> None:
    ${downgrades if downgrades else "pass"}
'''

_FILE_TEMPLATE = "%%(year)d%%(month).2d%%(day).2d_%%(rev)s_%%(slug)s"
"""Revision file names sort by date: ``20250101_1a2b3c4d5e6f_add_users.py``."""


@dataclass(frozen=True, slots=True)
class Revision:
    """One migration script."""

    revision: str
    """Its id."""
    down_revision: tuple[str, ...]
    """The revisions it follows (none for the first, two for a merge)."""
    message: str
    """The message it was made with."""
    path: Path
    """Its file."""
    is_head: bool
    """Whether no revision follows it."""


# -- the commands


def init(directory: str | Path) -> Path:
    """Make a migrations folder at ``directory`` (``env.py``, ``script.py.mako``,
    ``versions/``) and return its path.

    Raises :class:`~meshgate.data.errors.MigrationError` when ``directory`` exists and
    is not empty.
    """
    folder = Path(directory)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise MigrationError(
            f"cannot make a migrations folder at {folder}: it exists and is not empty; "
            "choose another directory, or use the migrations already there"
        )
    (folder / "versions").mkdir(parents=True, exist_ok=True)
    (folder / "env.py").write_text(ENV_TEMPLATE, encoding="utf-8")
    (folder / "script.py.mako").write_text(_SCRIPT_TEMPLATE, encoding="utf-8")
    (folder / "README").write_text(
        "Schema migrations of this service (Alembic). Apply them with\n"
        "`meshgate db upgrade SERVICE`; add one with `meshgate db revision SERVICE -m MESSAGE`.\n",
        encoding="utf-8",
    )
    return folder


def upgrade(
    database_url: str | Database,
    script_location: str | Path,
    revision: str = "head",
    *,
    version_table: str = VERSION_TABLE,
    lock_timeout: float = LOCK_TIMEOUT,
) -> str | None:
    """Upgrade the database to ``revision`` (``head``: the latest; or ``+1``) and return
    the revision it is at then."""
    config = _config(script_location, version_table)
    return _run(
        _on_connection(
            database_url,
            config,
            lambda conn: _migrate(conn, config, "upgrade", revision),
            lock_timeout=lock_timeout,
        )
    )


def downgrade(
    database_url: str | Database,
    script_location: str | Path,
    revision: str,
    *,
    version_table: str = VERSION_TABLE,
    lock_timeout: float = LOCK_TIMEOUT,
) -> str | None:
    """Downgrade the database to ``revision`` (``base``: before the first; or ``-1``)
    and return the revision it is at then (None at base)."""
    config = _config(script_location, version_table)
    return _run(
        _on_connection(
            database_url,
            config,
            lambda conn: _migrate(conn, config, "downgrade", revision),
            lock_timeout=lock_timeout,
        )
    )


def current(
    database_url: str | Database,
    script_location: str | Path,
    *,
    version_table: str = VERSION_TABLE,
) -> str | None:
    """The revision the database is at (None before the first; several heads of
    branches are joined with commas).

    Raises :class:`~meshgate.data.errors.MigrationError` when the database is at a
    revision the scripts do not know (it is ahead of this code).
    """
    config = _config(script_location, version_table)
    return _run(
        _on_connection(database_url, config, lambda conn: _current(conn, config), lock_timeout=None)
    )


def history(script_location: str | Path) -> list[Revision]:
    """The migration scripts, newest first."""
    config = _config(script_location, VERSION_TABLE)
    scripts = _scripts(config)
    try:
        return [_info(script) for script in scripts.walk_revisions()]
    except (CommandError, RevisionError) as exc:
        raise MigrationError(f"migrations in {script_location}: {exc}") from exc


def heads(script_location: str | Path) -> tuple[str, ...]:
    """The head revisions of the scripts (one, unless the history branches); empty
    when there is no script yet.

    Raises :class:`~meshgate.data.errors.MigrationError` when the folder is missing or
    its scripts cannot be read."""
    config = _config(script_location, VERSION_TABLE)
    scripts = _scripts(config)
    try:
        return tuple(sorted(scripts.get_heads()))
    except (CommandError, RevisionError) as exc:
        raise MigrationError(f"migrations in {script_location}: {exc}") from exc


def verify_revision(
    conn: Connection,
    script_location: str | Path,
    expected: tuple[str, ...],
    *,
    version_table: str = VERSION_TABLE,
    where: str = "the database",
) -> str | None:
    """Check that the database of ``conn`` (a sync connection) is at ``expected``, the
    :func:`heads` of ``script_location``; return its revision (None at base, when there
    is no script).

    Raises :class:`~meshgate.data.errors.UnmigratedDatabaseError` naming what is wrong:
    no revision (never migrated, or deleted or replaced since), an older one, or one
    the scripts do not have (migrated by newer code). ``where`` names the database in
    the message.
    """
    found = tuple(
        sorted(
            MigrationContext.configure(
                conn, opts={"version_table": version_table}
            ).get_current_heads()
        )
    )
    if found == expected:
        return ",".join(found) or None
    want = ", ".join(expected) or "base"
    upgrade_hint = (
        "migrate it: `meshgate db upgrade SERVICE` (meshgate up runs it for services "
        "with migrate: true), or let the service migrate it when it starts "
        "(Service(..., migrate=True) or MESHGATE_MIGRATE=1)"
    )
    if not found:
        raise UnmigratedDatabaseError(
            f"{where} has no schema revision (no {version_table} table, or an empty one), "
            f"but the migrations in {script_location} are at {want}: it was never "
            f"migrated, or was deleted or replaced since; {upgrade_hint}"
        )
    scripts = _scripts(_config(script_location, version_table))
    unknown = []
    for head in found:
        try:
            known = scripts.get_revision(head)
        except (CommandError, RevisionError):
            known = None
        if known is None:
            unknown.append(head)
    if unknown:
        raise UnmigratedDatabaseError(
            f"{where} is at revision {', '.join(unknown)}, which the migrations in "
            f"{script_location} do not have: it is ahead of this code (migrated by a newer "
            "version?); deploy the code that has that revision, or downgrade with it"
        )
    raise UnmigratedDatabaseError(
        f"{where} is at revision {', '.join(found)}, behind the migrations in "
        f"{script_location} ({want}); {upgrade_hint}"
    )


def revision(
    message: str,
    script_location: str | Path,
    *,
    autogenerate: bool = False,
    database_url: str | Database | None = None,
    metadata: MetaData | None = None,
    version_table: str = VERSION_TABLE,
) -> Revision:
    """Write a new migration script after the current head and return it.

    With ``autogenerate``, the script holds the changes that take the database (which
    must be at head, so ``database_url`` is needed) to ``metadata`` (else the
    ``target_metadata`` of ``env.py``); tables that the metadata does not name are left
    alone. Without it, the script is empty for you to fill in.
    """
    if not message.strip():
        raise MigrationError("a revision needs a message saying what it changes (-m MESSAGE)")
    config = _config(script_location, version_table)
    _scripts(config)  # a missing folder is reported before anything else
    if metadata is not None:
        config.attributes[_METADATA] = metadata
    if not autogenerate:
        return _revision(config, message, autogenerate=False)
    if database_url is None:
        raise MigrationError(
            "autogenerate compares the models with a database: give its URL "
            "(--database-url, MESHGATE_DATABASE_URL or database_url=)"
        )

    def work(conn: Connection) -> Revision:
        config.attributes[_CONNECTION] = conn
        try:
            return _revision(config, message, autogenerate=True)
        finally:
            conn.rollback()  # autogenerate only reads

    return _run(_on_connection(database_url, config, work, lock_timeout=None))


def run_env(context: Any, target_metadata: MetaData | None = None) -> None:
    """The body of a migrations folder's ``env.py``: run the migrations on the
    connection meshgate opened (``context`` is ``alembic.context``)."""
    config = context.config
    connection = config.attributes.get(_CONNECTION)
    if connection is None or context.is_offline_mode():
        raise MigrationError(
            "these migrations run through meshgate, which connects to the database: use "
            "`meshgate db upgrade SERVICE` or meshgate.data.migrations.upgrade(url, folder)"
        )
    metadata = config.attributes.get(_METADATA, target_metadata)
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table=config.attributes.get(_VERSION_TABLE, VERSION_TABLE),
        # SQLite alters tables by copying them: autogenerate writes batch operations.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        include_name=_include_name(metadata),
        render_item=_render_item,
    )
    with context.begin_transaction():
        context.run_migrations()


# -- internals


def _render_item(kind: str, obj: Any, autogen_context: Any) -> str | Literal[False]:
    """Autogenerate writes meshgate's column types by name, with their import (Alembic
    would write ``meshgate.data.types.UTCDateTime()`` and import nothing)."""
    if kind == "type" and isinstance(obj, UTCDateTime):
        autogen_context.imports.add("from meshgate.data.types import UTCDateTime")
        return "UTCDateTime()"
    return False


def _include_name(metadata: MetaData | None) -> Callable[[str | None, str, Any], bool]:
    """Autogenerate looks only at the tables ``metadata`` names: a table in the database
    but not in the metadata belongs to someone else (another service, a tool), and
    must neither be reflected nor proposed for dropping."""
    names = set(metadata.tables) if metadata is not None else set()

    def include(name: str | None, type_: str, parent_names: Any) -> bool:
        if type_ != "table" or name is None:
            return True
        schema = parent_names.get("schema_name")
        return (f"{schema}.{name}" if schema else name) in names

    return include


def _config(script_location: str | Path, version_table: str) -> Config:
    # Quiet: the caller reports what happened (the CLI prints the revision it made).
    config = Config(cmd_opts=argparse.Namespace(quiet=True))
    config.set_main_option("script_location", str(script_location))
    config.set_main_option("file_template", _FILE_TEMPLATE)
    config.attributes[_VERSION_TABLE] = version_table
    return config


def _scripts(config: Config) -> ScriptDirectory:
    where = config.get_main_option("script_location")
    folder = Path(where or "")
    if not (folder / "env.py").is_file():
        raise MigrationError(
            f"no migrations folder at {folder} (no env.py there): make one with "
            f"`meshgate db init SERVICE` or meshgate.data.migrations.init({str(folder)!r}), "
            "or point to the right directory (--migrations DIR)"
        )
    try:
        return ScriptDirectory.from_config(config)
    except CommandError as exc:
        raise MigrationError(f"migrations in {folder}: {exc}") from exc


def _info(script: Script) -> Revision:
    down = script.down_revision
    downs = () if down is None else (down,) if isinstance(down, str) else tuple(down)
    return Revision(
        revision=script.revision,
        down_revision=downs,
        message=script.doc,
        path=Path(script.path),
        is_head=script.is_head,
    )


def _revision(config: Config, message: str, *, autogenerate: bool) -> Revision:
    try:
        made = command.revision(config, message=message, autogenerate=autogenerate)
    except (CommandError, RevisionError) as exc:
        raise MigrationError(f"cannot make a revision: {exc}") from exc
    if isinstance(made, list):  # several heads; we never ask for that
        made = made[0]
    if made is None:  # pragma: no cover - only with a custom process_revision_directives
        raise MigrationError("no revision was written")
    return _info(made)


def _heads(conn: Connection, config: Config) -> tuple[str, ...]:
    """The database's revisions, checked against the scripts."""
    version_table = config.attributes[_VERSION_TABLE]
    heads = MigrationContext.configure(
        conn, opts={"version_table": version_table}
    ).get_current_heads()
    scripts = _scripts(config)
    for head in heads:
        try:
            known = scripts.get_revision(head)
        except (CommandError, RevisionError):
            known = None
        if known is None:
            raise MigrationError(
                f"the database is at revision {head!r} (table {version_table}), which the "
                f"migrations in {config.get_main_option('script_location')} do not have: "
                "the database is ahead of this code (migrated by a newer version?). Deploy "
                "the code that has that revision, or downgrade with it"
            )
    return tuple(heads)


def _current(conn: Connection, config: Config) -> str | None:
    heads = _heads(conn, config)
    return ",".join(heads) if heads else None


def _migrate(conn: Connection, config: Config, direction: str, revision: str) -> str | None:
    _heads(conn, config)
    config.attributes[_CONNECTION] = conn
    run = command.upgrade if direction == "upgrade" else command.downgrade
    try:
        run(config, revision)
    except (CommandError, RevisionError) as exc:
        raise MigrationError(f"{direction} to {revision!r}: {exc}") from exc
    except DataError:
        raise
    except Exception as exc:
        raise MigrationError(
            f"{direction} to {revision!r} failed in a revision's code and was "
            f"{'stopped' if conn.dialect.name in ('mysql', 'mariadb') else 'rolled back'}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    return _current(conn, config)


def _database(database_url: str | Database) -> Database:
    if isinstance(database_url, Database):
        # The caller's engine belongs to its event loop; this one gets its own.
        url = database_url._backend.url.render_as_string(hide_password=False)
        name = database_url.name
    else:
        url, name = database_url, "migrations"
    return Database(url, name=name, slow_query=None, registry=CollectorRegistry())


async def _on_connection(
    database_url: str | Database,
    config: Config,
    work: Callable[[Connection], T],
    *,
    lock_timeout: float | None,
) -> T:
    """Run ``work`` on a sync connection of a fresh engine, under the migration lock
    when ``lock_timeout`` is given, and commit."""
    database = _database(database_url)
    try:
        async with database.engine.connect() as conn:
            locked: str | None = None
            if lock_timeout is not None:
                locked = await _lock(conn, database, config, lock_timeout)
            try:
                result = await conn.run_sync(work)
                await conn.commit()
            finally:
                if locked is not None:
                    await _unlock(conn, locked)
            return result
    finally:
        await database.close()


async def _lock(
    conn: AsyncConnection, database: Database, config: Config, timeout: float
) -> str | None:
    """Take the migration lock of the version table; return the name of a MySQL lock
    to release (the others end with the transaction)."""
    dialect = conn.dialect.name
    version_table = config.attributes[_VERSION_TABLE]
    waited = (
        f"another process has been migrating database {database.name!r} ({database.url}, "
        f"table {version_table}) for more than {timeout:g} s: wait for it to finish, or "
        "find and stop it"
    )
    if dialect == "sqlite":
        await conn.execution_options(**{BEGIN_OPTION: "IMMEDIATE"})
        await conn.exec_driver_sql("SELECT 1")  # BEGIN IMMEDIATE: the write lock, now
        return None
    if dialect == "postgresql":
        key = zlib.crc32(f"meshgate.migrations:{version_table}".encode())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not (
            await conn.execute(text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": key})
        ).scalar():
            if loop.time() >= deadline:
                raise MigrationError(waited)
            await asyncio.sleep(_LOCK_POLL)
        return None
    if dialect in ("mysql", "mariadb"):
        name = f"meshgate.migrations:{version_table}"[:64]
        got = (
            await conn.execute(
                text("SELECT GET_LOCK(:name, :timeout)"),
                {"name": name, "timeout": max(0, round(timeout))},
            )
        ).scalar()
        if got != 1:
            raise MigrationError(waited)
        return name
    return None  # pragma: no cover - every supported engine is above


async def _unlock(conn: AsyncConnection, name: str) -> None:
    try:
        await conn.execute(text("SELECT RELEASE_LOCK(:name)"), {"name": name})
        await conn.commit()
    except DataError:
        pass  # the connection is gone, and its lock with it


def _run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    # Called from async code: this thread's loop is busy running the caller.
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="meshgate-migrate") as pool:
        return pool.submit(asyncio.run, coro).result()
