"""``meshgate db``: a service's schema migrations (Alembic), over
:mod:`meshgate.data.migrations`, and its verified backups (``backup``, ``restore``,
``verify``), over :mod:`meshgate.data.backup` (docs/backup.md).

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

import contextlib
import importlib
import importlib.util
import json
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from meshgate.cli._extras import missing_extra, one_line
from meshgate.errors import MeshgateError

if TYPE_CHECKING:
    from meshgate.data import Database

__all__ = ["app"]

app = typer.Typer(
    name="db",
    help="A service's database: migrations (Alembic: upgrade, downgrade, current, "
    "history, revision, init) and verified backups (backup, restore, verify).",
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
        missing = missing_extra(exc)
        if missing is not None:
            raise _UnresolvedError(f"SERVICE {service!r}: {missing}") from exc
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
    err.print(f"error: {one_line(exc)}", markup=False, highlight=False)
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
        events_now = _upgrade_events(service, _need_url(target)) if to == "head" else None
    except MeshgateError as exc:
        raise _fail(exc) from None
    out.print(f"{service}: at revision {now or 'base'}", highlight=False)
    if events_now is not None:
        out.print(f"{service}: event tables at revision {events_now}", highlight=False)


def _upgrade_events(service: str, url: str | Database) -> str | None:
    """A service that uses events gets its event tables (outbox, inbox, sagas) too."""
    from meshgate.events.service import upgrade_events_of  # noqa: PLC0415

    return upgrade_events_of(service, url)


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


# -- backup, restore, verify


class _Method(StrEnum):
    logical = "logical"
    native = "native"
    auto = "auto"


JsonFlag = Annotated[
    bool,
    typer.Option("--json", help="Print the result (the archive's manifest) as JSON on stdout."),
]
ProgressFlag = Annotated[
    bool | None,
    typer.Option(
        "--progress/--no-progress",
        help="Show a progress bar on stderr (default: when stderr is a terminal).",
        show_default=False,
    ),
]


class _RichProgress:
    """A Rich progress bar on stderr, one task per step."""

    def __init__(self, label: str) -> None:
        from rich.progress import (  # noqa: PLC0415 - only for long runs on a terminal
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self._label = label
        self._bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err,
            transient=True,
        )
        self._task: Any = None

    def __enter__(self) -> _RichProgress:
        self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.stop()

    def begin(self, step: str, total: int | None) -> None:
        self._task = self._bar.add_task(f"{self._label}: {step}", total=total or None)

    def advance(self, amount: int) -> None:
        if self._task is not None:
            self._bar.advance(self._task, amount)

    def end(self) -> None:
        if self._task is not None:
            self._bar.remove_task(self._task)
            self._task = None


def _progress(enabled: bool | None, label: str) -> contextlib.AbstractContextManager[Any]:
    show = err.is_terminal if enabled is None else enabled
    return _RichProgress(label) if show else contextlib.nullcontext(None)


def _service_name(service: str) -> str:
    """The service's name: its Service's ``name`` when SERVICE is a module, else SERVICE."""
    module_name, _, attr = service.partition(":")
    if "." not in module_name and not attr:
        return service
    module = _import(module_name)
    for holder in (getattr(module, attr, None) if attr else None, getattr(module, "service", None)):
        name = getattr(holder, "name", None)
        if isinstance(name, str) and name:
            return name
    return module_name


def _fail_json(exc: Exception, as_json: bool, code: int) -> typer.Exit:
    err.print(f"error: {one_line(exc)}", markup=False, highlight=False)
    if as_json:
        out.print_json(json.dumps({"ok": False, "error": str(exc), "kind": type(exc).__name__}))
    return typer.Exit(code)


def _exit_code(exc: MeshgateError) -> int:
    from meshgate.errors import ConfigError  # noqa: PLC0415

    return 2 if isinstance(exc, _UnresolvedError | ConfigError) else 1


@app.command()
def backup(  # noqa: PLR0917 - typer reads the parameters as options
    services: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="SERVICE...",
            help="The service (a name or module path, as for upgrade); with --all, the "
            "services to back up (default: every service of the system file).",
            show_default=False,
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="The archive (default: .meshgate/backups/SERVICE-<UTC time>.mgbak of the "
            "system here; a folder puts it there). With --all: the folder (default: "
            ".meshgate/backups/<system>-<UTC time>).",
            show_default=False,
        ),
    ] = None,
    all_services: Annotated[
        bool,
        typer.Option("--all", help="Back up every service of the system, one archive each."),
    ] = False,
    file: Annotated[
        Path | None,
        typer.Option(
            "--file",
            "-f",
            envvar="MESHGATE_FILE",
            help="The system file of --all (default: meshgate.yaml here).",
            show_default=False,
        ),
    ] = None,
    method: Annotated[
        _Method,
        typer.Option(
            "--method",
            help="logical: portable rows (restore on any engine); native: the engine's "
            "dump tool on the same snapshot (same engine only); auto: native when the tool "
            "is installed.",
        ),
    ] = _Method.logical,
    compress_level: Annotated[
        int, typer.Option("--compress-level", min=0, max=9, help="Deflate level, 0-9.")
    ] = 6,
    as_json: JsonFlag = False,
    progress: ProgressFlag = None,
    database_url: DatabaseUrl = None,
    migrations: Migrations = None,
    version_table: VersionTable = "alembic_version",
) -> None:
    """Back up SERVICE's database into an archive while the service keeps writing
    (or every service of a system with --all)."""
    from meshgate.data import backup as bk  # noqa: PLC0415

    if all_services:
        _backup_all(services or [], output, file, method.value, compress_level, as_json, progress)
        return
    if not services or len(services) != 1:
        err.print(
            "error: name one SERVICE to back up (or --all for every service of the system)",
            highlight=False,
        )
        raise typer.Exit(2)
    service = services[0]
    try:
        target = _resolve(service, database_url, migrations)
        url = _need_url(target)
        name = _service_name(service)
        path = (
            output if output is not None else _backups_folder(file) / bk.default_archive_name(name)
        )
        with _progress(progress, f"backup {name}") as bar:
            manifest = bk.backup(
                url,
                path,
                service=name,
                service_ref=service,
                migrations=target.migrations,
                version_table=version_table,
                method=method.value,
                compresslevel=compress_level,
                progress=bar,
            )
    except MeshgateError as exc:
        raise _fail_json(exc, as_json, _exit_code(exc)) from None
    where = path / bk.default_archive_name(name) if path.is_dir() else path
    if as_json:
        out.print_json(manifest.model_dump_json())
        return
    _print_backup(name, manifest, where)


def _backups_folder(file: Path | None) -> Path:
    """Where backups go without --output: ``backups/`` in the state folder (kept out
    of version control by its .gitignore) of the system here: that of --file, of the
    nearest meshgate.yaml at or above this folder, or of a system running from here;
    else ``.meshgate/backups`` in this folder.

    Raises:
        AmbiguousSystemError: several running systems fit this folder.
    """
    from meshgate.runner.systems import find_system  # noqa: PLC0415

    state, _ = find_system(file, command="db backup", running=False, anywhere=False)
    state.ensure()
    folder = state.path / "backups"
    folder.mkdir(mode=0o700, exist_ok=True)
    return folder


def _print_backup(name: str, manifest: Any, where: Path) -> None:
    size = where.stat().st_size if where.exists() else 0
    position = ", ".join(f"{k} {v}" for k, v in manifest.snapshot.position.items() if v)
    out.print(
        f"{name}: backed up {len(manifest.tables)} tables, {manifest.rows} rows "
        f"({manifest.source.engine}, revision {manifest.migrations.revision or 'none'}) to "
        f"{where} ({size / 1e6:.1f} MB) in {manifest.duration_s:.2f} s; snapshot at "
        f"{manifest.snapshot.taken_at.isoformat()}" + (f" ({position})" if position else ""),
        highlight=False,
    )
    for note in manifest.snapshot.notes:
        err.print(f"note: {note}", markup=False, highlight=False)


def _backup_all(  # noqa: PLR0917 - the options of `backup --all`, passed on
    names: list[str],
    output: Path | None,
    file: Path | None,
    method: str,
    compress_level: int,
    as_json: bool,
    progress: bool | None,
) -> None:
    from meshgate.data import backup as bk  # noqa: PLC0415

    try:
        system, targets = _system_targets(file, names)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        folder = output if output is not None else _backups_folder(file) / f"{system}-{stamp}"
    except MeshgateError as exc:
        raise _fail_json(exc, as_json, 2) from None
    show = err.is_terminal if progress is None else progress
    bars = contextlib.ExitStack()

    def bar(name: str) -> Any:
        # One live bar at a time: the previous service's ends when the next starts.
        bars.close()
        return bars.enter_context(_RichProgress(f"backup {name}")) if show else None

    with bars:
        result = bk.backup_system(
            targets,
            folder,
            system=system,
            method=method,  # type: ignore[arg-type]
            compresslevel=compress_level,
            progress=bar,
        )
    if as_json:
        out.print_json(json.dumps(result.data))
    else:
        for entry in result.services:
            if entry["status"] == "ok":
                out.print(
                    f"{entry['name']}: {entry['rows']} rows, snapshot at {entry['taken_at']} "
                    f"-> {folder / entry['archive']}",
                    highlight=False,
                )
            elif entry["status"] == "skipped":
                out.print(f"{entry['name']}: skipped ({entry['reason']})", highlight=False)
            else:
                err.print(f"{entry['name']}: FAILED: {entry['error']}", markup=False)
        out.print(f"index: {result.index}", highlight=False)
        err.print(f"note: {bk.CONSISTENCY_STATEMENT}", markup=False, highlight=False)
    if result.failed:
        raise typer.Exit(1)


def _system_targets(file: Path | None, names: list[str]) -> tuple[str, list[Any]]:
    """The services of the system file (or the SERVICE arguments) as backup targets."""
    from meshgate.data.backup import ServiceTarget  # noqa: PLC0415

    if file is None and names and not Path("meshgate.yaml").is_file():
        # No system file: SERVICE arguments resolve as for a single backup.
        targets = []
        for name in names:
            target = _resolve(name, None, None)
            targets.append(
                ServiceTarget(
                    name=_service_name(name),
                    database=target.url,
                    migrations=target.migrations,
                    ref=name,
                    skip=None if target.url is not None else "no database URL",
                )
            )
        return "services", targets
    try:
        from meshgate.runner.loader import load_system  # noqa: PLC0415
        from meshgate.runner.model import EMBEDDED  # noqa: PLC0415
    except ImportError as exc:  # pragma: no cover - the runner ships with meshgate
        raise _UnresolvedError(
            f"reading a system file needs meshgate.runner ({exc}); name the services instead: "
            "meshgate db backup --all SERVICE..."
        ) from None

    loaded = load_system(file or Path("meshgate.yaml"))
    unknown = sorted(set(names) - set(loaded.system.services))
    if unknown:
        raise _UnresolvedError(
            f"{loaded.path} has no service {', '.join(unknown)}; it has "
            f"{', '.join(loaded.system.services) or 'none'}"
        )
    root = str(loaded.root)
    if root not in sys.path:
        sys.path.insert(0, root)
    values = {"state": str(loaded.state), "root": root, "system": loaded.name}
    targets = []
    for name, spec in loaded.system.services.items():
        if names and name not in names:
            continue
        database = None
        if spec.database == EMBEDDED:
            # Where `meshgate up` keeps an embedded database (runner/supervisor.py).
            database = f"sqlite:///{loaded.state / 'data' / name}.db"
        elif spec.database is not None:
            database = spec.database.format_map({**values, "name": name})
        targets.append(
            ServiceTarget(
                name=name,
                database=database,
                migrations=_app_migrations(spec.app),
                ref=spec.app or name,
                skip=None if database is not None else "it has no database in the system file",
            )
        )
    return loaded.name, targets


def _app_migrations(app_ref: str | None) -> Path | None:
    """The ``migrations`` folder beside an app's module, found without importing it (the
    module may need the environment ``meshgate up`` gives it)."""
    if app_ref is None:
        return None
    try:
        spec = importlib.util.find_spec(app_ref.partition(":")[0])
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "migrations"
    return folder if (folder / "env.py").is_file() else None


@app.command()
def restore(  # noqa: PLR0917 - typer reads the parameters as options
    service: Service,
    archive: Annotated[
        Path, typer.Argument(help="The archive to restore (.mgbak).", show_default=False)
    ],
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Drop every table of a target that is not empty, then restore."
        ),
    ] = False,
    any_service: Annotated[
        bool,
        typer.Option("--any-service", help="Restore an archive of another service into this one."),
    ] = False,
    as_json: JsonFlag = False,
    progress: ProgressFlag = None,
    database_url: DatabaseUrl = None,
    migrations: Migrations = None,
    version_table: Annotated[
        str | None,
        typer.Option(
            "--version-table",
            help="The table recording the revision (default: the archive's).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Restore ARCHIVE into SERVICE's database: checked before (checksums, service,
    schema revision) and after (row counts and checksums of every table)."""
    from meshgate.data import backup as bk  # noqa: PLC0415

    try:
        if not archive.is_file():
            raise _UnresolvedError(f"no archive at {archive}: check the path")
        target = _resolve(service, database_url, migrations)
        url = _need_url(target)
        name = _service_name(service)
        with _progress(progress, f"restore {name}") as bar:
            report = bk.restore(
                url,
                archive,
                service=name,
                migrations=target.migrations,
                version_table=version_table,
                force=force,
                any_service=any_service,
                progress=bar,
            )
    except MeshgateError as exc:
        raise _fail_json(exc, as_json, _exit_code(exc)) from None
    if as_json:
        out.print_json(json.dumps(report.to_dict()))
    else:
        out.print(
            f"{name}: restored {len(report.tables)} tables, {report.rows} rows from {archive} "
            f"into {report.target} in {report.duration_s:.2f} s; verified: every table's row "
            f"count and checksum match the archive (schema: {report.schema}, revision "
            f"{report.revision or 'none'})",
            highlight=False,
        )
    for note in report.notes:
        err.print(f"note: {note}", markup=False, highlight=False)
    if report.behind_head:
        err.print(
            f"note: the database is at revision {report.revision}, behind the service's head "
            f"({', '.join(report.heads)}): run `meshgate db upgrade {service}`",
            markup=False,
            highlight=False,
        )


@app.command()
def verify(
    archive: Annotated[
        Path, typer.Argument(help="The archive to check (.mgbak).", show_default=False)
    ],
    migrations: Annotated[
        Path | None,
        typer.Option(
            "--migrations",
            help="Also check that these migrations can restore the archive's schema revision.",
            show_default=False,
        ),
    ] = None,
    as_json: JsonFlag = False,
    progress: ProgressFlag = None,
) -> None:
    """Check ARCHIVE completely without restoring it: container, manifest, every
    member's SHA-256, every table's rows (count and checksum)."""
    from meshgate.data import backup as bk  # noqa: PLC0415

    try:
        if not archive.is_file():
            raise _UnresolvedError(f"no archive at {archive}: check the path")
        with _progress(progress, f"verify {archive.name}") as bar:
            report = bk.verify(archive, migrations=migrations, progress=bar)
    except MeshgateError as exc:
        raise _fail_json(exc, as_json, _exit_code(exc)) from None
    manifest = report.manifest
    if as_json:
        out.print_json(json.dumps(report.to_dict()))
        return
    out.print(
        f"{archive}: ok: {manifest.service.name}, {manifest.source.engine} "
        f"{manifest.source.version}, {manifest.method}, revision "
        f"{manifest.migrations.revision or 'none'}, {len(manifest.tables)} tables, "
        f"{manifest.rows} rows, snapshot at {manifest.snapshot.taken_at.isoformat()}; checked "
        + ", ".join(report.checked),
        highlight=False,
    )
    for note in report.notes:
        err.print(f"note: {note}", markup=False, highlight=False)
