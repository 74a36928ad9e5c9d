"""``meshgate db``: a service's schema migrations (Alembic), over
:mod:`meshgate.data.migrations`.

SERVICE names the service in one of two ways:

- a plain name (``users``): its migrations are in ``services/users/migrations``
  under the current directory, and the database URL comes from ``--database-url``
  or ``MESHGATE_DATABASE_URL``;
- a dotted module path (``shop.users.app``, or ``shop.users.app:service``), imported
  from the current directory: its ``MIGRATIONS`` (a path; default: the
  ``migrations`` folder beside the module), its ``database`` (a
  :class:`~meshgate.data.Database`; else the ``database`` of its ``service`` or of
  the object after the colon; else ``DATABASE_URL``, a string) and, for
  ``--autogenerate``, its ``metadata``.

``--migrations DIR`` and ``--database-url`` / ``MESHGATE_DATABASE_URL`` override
what the module says.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from meshgate.errors import MeshgateError

if TYPE_CHECKING:
    from meshgate.data import Database

__all__ = ["app"]

app = typer.Typer(
    name="db",
    help="Database migrations of a service (Alembic): upgrade, downgrade, current, "
    "history, revision, init.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)

ENV_URL = "MESHGATE_DATABASE_URL"

Service = Annotated[
    str,
    typer.Argument(
        help="The service: a name (migrations in services/NAME/migrations) or a module "
        "path such as shop.users.app (exposing database and MIGRATIONS).",
        show_default=False,
    ),
]
DatabaseUrl = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        envvar=ENV_URL,
        help="The database URL (default: the module's database).",
        show_default=False,
    ),
]
Migrations = Annotated[
    Path | None,
    typer.Option(
        "--migrations",
        help="The migrations folder (default: services/SERVICE/migrations, or the "
        "module's MIGRATIONS).",
        show_default=False,
    ),
]
VersionTable = Annotated[
    str, typer.Option("--version-table", help="The table recording the database's revision.")
]


class _UnresolvedError(MeshgateError):
    """SERVICE could not be turned into a migrations folder or a database URL."""


@dataclass(frozen=True, slots=True)
class _Target:
    service: str
    migrations: Path
    url: str | Database | None
    metadata: Any


def _resolve(service: str, database_url: str | None, migrations: Path | None) -> _Target:
    module_name, _, attr = service.partition(":")
    module = _import(module_name) if "." in module_name or attr else None
    folder = migrations
    if folder is None and module is not None:
        declared = getattr(module, "MIGRATIONS", None)
        if declared is not None:
            folder = Path(declared)
        elif getattr(module, "__file__", None):
            folder = Path(module.__file__).parent / "migrations"
    if folder is None:
        folder = Path("services") / service / "migrations"
    url: str | Database | None = database_url
    if url is None and module is not None:
        url = _module_database(module, attr)
    return _Target(service, folder, url, getattr(module, "metadata", None))


def _module_database(module: Any, attr: str) -> Any:
    """The module's ``database``, else that of its ``service`` (or of ``module:attr``),
    else its ``DATABASE_URL``."""
    holders = [getattr(module, attr, None)] if attr else []
    holders += [module, getattr(module, "service", None)]
    for holder in holders:
        database = getattr(holder, "database", None)
        if database is not None:
            return database
    return getattr(module, "DATABASE_URL", None)


def _import(service: str) -> Any:
    # As uvicorn does: the service's code is found from the current directory.
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        return importlib.import_module(service)
    except ImportError as exc:
        raise _UnresolvedError(
            f"SERVICE {service!r} names a module (it has a dot), which cannot be imported "
            f"from {Path.cwd()}: {exc}. Run from the directory that holds it, or give a "
            "plain service name with --migrations DIR and --database-url URL"
        ) from exc


def _need_url(target: _Target) -> str | Database:
    if target.url is None:
        raise _UnresolvedError(
            f"no database URL for service {target.service!r}: pass --database-url URL or "
            f"set {ENV_URL} (or name the service's module, pkg.module, whose `database` "
            "is its meshgate Database)"
        )
    return target.url


def _need_folder(target: _Target) -> Path:
    if not (target.migrations / "env.py").is_file():
        raise _UnresolvedError(
            f"no migrations folder for service {target.service!r} at {target.migrations} "
            f"(from {Path.cwd()}): make one with `meshgate db init {target.service}`, or "
            "point to it with --migrations DIR"
        )
    return target.migrations


def _fail(exc: MeshgateError) -> typer.Exit:
    err.print(f"error: {exc}", markup=False, highlight=False)
    return typer.Exit(2 if isinstance(exc, _UnresolvedError) else 1)


@app.command()
def upgrade(
    service: Service,
    to: Annotated[str, typer.Option("--to", help="The revision to reach.")] = "head",
    database_url: DatabaseUrl = None,
    migrations: Migrations = None,
    version_table: VersionTable = "alembic_version",
) -> None:
    """Upgrade SERVICE's database to the latest revision (or --to REV)."""
    from meshgate.data import migrations as mig  # noqa: PLC0415 - keep the CLI fast

    try:
        target = _resolve(service, database_url, migrations)
        now = mig.upgrade(_need_url(target), _need_folder(target), to, version_table=version_table)
    except MeshgateError as exc:
        raise _fail(exc) from None
    out.print(f"{service}: at revision {now or 'base'}", highlight=False)


@app.command()
def downgrade(
    service: Service,
    to: Annotated[
        str,
        typer.Option(
            "--to", help="The revision to go back to (base: before the first).", show_default=False
        ),
    ],
    database_url: DatabaseUrl = None,
    migrations: Migrations = None,
    version_table: VersionTable = "alembic_version",
) -> None:
    """Downgrade SERVICE's database to --to REV."""
    from meshgate.data import migrations as mig  # noqa: PLC0415

    try:
        target = _resolve(service, database_url, migrations)
        now = mig.downgrade(
            _need_url(target), _need_folder(target), to, version_table=version_table
        )
    except MeshgateError as exc:
        raise _fail(exc) from None
    out.print(f"{service}: at revision {now or 'base'}", highlight=False)


@app.command()
def current(
    service: Service,
    database_url: DatabaseUrl = None,
    migrations: Migrations = None,
    version_table: VersionTable = "alembic_version",
) -> None:
    """Print the revision SERVICE's database is at (base: none applied)."""
    from meshgate.data import migrations as mig  # noqa: PLC0415

    try:
        target = _resolve(service, database_url, migrations)
        folder = _need_folder(target)
        now = mig.current(_need_url(target), folder, version_table=version_table)
        heads = {r.revision for r in mig.history(folder) if r.is_head}
    except MeshgateError as exc:
        raise _fail(exc) from None
    if now is not None and now in heads:
        state = " (head)"
    elif heads:
        state = f" (behind head: run `meshgate db upgrade {service}`)"
    else:
        state = ""
    out.print(f"{service}: at revision {now or 'base'}{state}", highlight=False)


@app.command()
def history(service: Service, migrations: Migrations = None) -> None:
    """List SERVICE's migrations, newest first."""
    from meshgate.data import migrations as mig  # noqa: PLC0415

    try:
        target = _resolve(service, None, migrations)
        revisions = mig.history(_need_folder(target))
    except MeshgateError as exc:
        raise _fail(exc) from None
    if not revisions:
        out.print(f"{service}: no migrations yet", highlight=False)
    for rev in revisions:
        down = ",".join(rev.down_revision) or "base"
        head = " (head)" if rev.is_head else ""
        out.print(f"{down} -> {rev.revision}{head}: {rev.message}", highlight=False)


@app.command()
def revision(  # noqa: PLR0917 - typer reads the parameters as options
    service: Service,
    message: Annotated[
        str, typer.Option("--message", "-m", help="What the revision changes.", show_default=False)
    ],
    autogenerate: Annotated[
        bool,
        typer.Option(
            "--autogenerate", help="Write the changes from the database to the models' metadata."
        ),
    ] = False,
    database_url: DatabaseUrl = None,
    migrations: Migrations = None,
    version_table: VersionTable = "alembic_version",
) -> None:
    """Write a new migration of SERVICE (empty, or --autogenerate'd from its models)."""
    from meshgate.data import migrations as mig  # noqa: PLC0415

    try:
        target = _resolve(service, database_url, migrations)
        made = mig.revision(
            message,
            _need_folder(target),
            autogenerate=autogenerate,
            database_url=_need_url(target) if autogenerate else None,
            metadata=target.metadata,
            version_table=version_table,
        )
    except MeshgateError as exc:
        raise _fail(exc) from None
    out.print(f"{service}: wrote revision {made.revision} at {made.path}", highlight=False)


@app.command()
def init(service: Service, migrations: Migrations = None) -> None:
    """Make SERVICE's migrations folder (services/SERVICE/migrations, or --migrations DIR)."""
    from meshgate.data import migrations as mig  # noqa: PLC0415

    try:
        target = _resolve(service, None, migrations)
        folder = mig.init(target.migrations)
    except MeshgateError as exc:
        raise _fail(exc) from None
    out.print(
        f"{service}: migrations folder made at {folder}; add a revision with "
        f"`meshgate db revision {service} -m MESSAGE`",
        highlight=False,
    )
