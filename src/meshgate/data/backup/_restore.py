"""``restore``: an archive into a service's database, checked before and after."""

from __future__ import annotations

import binascii
import json
import logging
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import sqlalchemy as sa

from meshgate.data import migrations as alembic
from meshgate.data.backup._revisions import SchemaPlan, plan_schema
from meshgate.data.backup.archive import ArchiveReader, rows_altered
from meshgate.data.backup.codec import (
    Converter,
    Digest,
    decoder,
    json_line_encoder,
    row_converter,
    row_encoder,
)
from meshgate.data.backup.engines import Engine, open_engine
from meshgate.data.backup.engines.base import database_errors
from meshgate.data.backup.engines.sqlite import SQLite
from meshgate.data.backup.errors import (
    ArchiveError,
    BackupError,
    IncompatibleArchiveError,
    RestoreVerificationError,
    TargetNotEmptyError,
)
from meshgate.data.backup.manifest import ColumnEntry, Manifest, TableEntry
from meshgate.data.backup.progress import NullProgress, Progress
from meshgate.data.backup.schema import build_table, describe_table
from meshgate.data.errors import MigrationError

if TYPE_CHECKING:
    from meshgate.data import Database

__all__ = ["RestoreReport", "TableCheck", "restore", "verify_target"]

log = logging.getLogger("meshgate.data")

_FAMILY = {"sqlite": "sqlite", "postgresql": "postgresql", "mysql": "mysql", "mariadb": "mysql"}


@dataclass(frozen=True)
class TableCheck:
    """A table as found in the target after the restore."""

    name: str
    rows: int
    digest: str


@dataclass(frozen=True)
class RestoreReport:
    """What a restore did."""

    manifest: Manifest
    target: str
    """The target's URL, password masked."""
    method: Literal["logical", "native"]
    schema: Literal["migrations", "archive", "existing", "native"]
    """How the schema was made: the service's migrations, the archive's description,
    the target's own (empty) tables, or the native dump."""
    revision: str | None
    heads: tuple[str, ...]
    """The heads of the service's migrations (empty when they were not at hand)."""
    tables: tuple[TableCheck, ...]
    duration_s: float
    notes: tuple[str, ...] = field(default=())

    @property
    def rows(self) -> int:
        return sum(t.rows for t in self.tables)

    @property
    def behind_head(self) -> bool:
        """Whether the restored schema is older than the service's migrations."""
        return bool(self.heads) and set((self.revision or "").split(",")) != set(self.heads)

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data (``--json``)."""
        return {
            "ok": True,
            "archive_service": self.manifest.service.name,
            "target": self.target,
            "method": self.method,
            "schema": self.schema,
            "revision": self.revision,
            "heads": list(self.heads),
            "behind_head": self.behind_head,
            "rows": self.rows,
            "tables": [
                {"name": t.name, "rows": t.rows, "digest": t.digest, "verified": True}
                for t in self.tables
            ],
            "duration_s": self.duration_s,
            "notes": list(self.notes),
            "manifest": self.manifest.model_dump(mode="json"),
        }


def restore(
    database: str | Database,
    path: str | Path,
    *,
    service: str = "default",
    migrations: str | Path | None = None,
    version_table: str | None = None,
    force: bool = False,
    any_service: bool = False,
    progress: Progress | None = None,
) -> RestoreReport:
    """Restore the archive at ``path`` into ``database`` and prove it complete.

    In order, before the target is touched: the archive's container, manifest and
    every member's checksum; that it is ``service``'s (unless ``any_service``); its
    schema revision against the migrations in ``migrations`` (the service's folder) (a newer one, or
    another service's, is refused); that the target is empty (unless ``force``,
    which drops every table in it). Then the schema is made (the service's migrations
    up to the archive's revision; the archive's description for what they lack), the
    rows loaded, and every table's row count and checksum compared with the
    manifest. On PostgreSQL and SQLite all of it is one transaction: a failure
    leaves the target as it was. MariaDB/MySQL commit DDL by themselves: a failure
    drops what the restore created, leaving the target empty.

    Raises :class:`ArchiveError`, :class:`IncompatibleArchiveError`,
    :class:`TargetNotEmptyError`, :class:`RestoreVerificationError` or
    :class:`BackupError` (a database error, or a native tool's).
    """
    try:
        return _restore(
            database,
            Path(path),
            service=service,
            folder=Path(migrations) if migrations is not None else None,
            version_table=version_table,
            force=force,
            any_service=any_service,
            progress=progress or NullProgress(),
        )
    except OSError as exc:
        raise BackupError(f"restore from {path} failed: {exc}") from exc


def _restore(
    database: str | Database,
    path: Path,
    *,
    service: str,
    folder: Path | None,
    version_table: str | None,
    force: bool,
    any_service: bool,
    progress: Progress,
) -> RestoreReport:
    started = time.perf_counter()
    with ArchiveReader(path) as reader:
        manifest = reader.manifest
        if not any_service and manifest.service.name != service:
            raise IncompatibleArchiveError(
                f"{path} is a backup of service {manifest.service.name!r}, not {service!r}: "
                f"restore it into {manifest.service.name!r}, or pass --any-service to put it "
                f"into {service!r} anyway"
            )
        plan = plan_schema(manifest, folder, service)
        engine = open_engine(database)
        if manifest.method == "native" and _FAMILY[manifest.source.engine] != engine.name:
            raise IncompatibleArchiveError(
                f"{path} holds a native {manifest.source.engine} dump, which only "
                f"{manifest.source.engine} restores; the target is {engine.name}. Take a "
                "logical backup (--method logical) to move between engines"
            )
        _check_members(reader, progress)
        vt = version_table or manifest.migrations.version_table
        sqlite_new = isinstance(engine, SQLite) and not engine.path.exists()
        if isinstance(engine, SQLite) and not engine.path.parent.is_dir():
            raise BackupError(
                f"cannot restore into {engine.path}: its directory does not exist; create it"
            )
        schema: Literal["migrations", "archive", "existing", "native"]
        try:
            with database_errors(engine, "restore"):
                if manifest.method == "native":
                    checks, schema = _restore_native(
                        engine, reader, vt, force=force, progress=progress
                    )
                    revision = manifest.migrations.revision
                else:
                    checks, schema, revision = _restore_logical(
                        engine, reader, plan, vt, force=force, progress=progress
                    )
        except BaseException:
            if sqlite_new and isinstance(engine, SQLite):
                engine.dispose()
                for suffix in ("", "-wal", "-shm", "-journal"):
                    Path(f"{engine.path}{suffix}").unlink(missing_ok=True)
            raise
        finally:
            engine.dispose()
    return RestoreReport(
        manifest=manifest,
        target=engine.masked_url,
        method=manifest.method,
        schema=schema,
        revision=revision,
        heads=plan.heads,
        tables=tuple(checks),
        duration_s=round(time.perf_counter() - started, 3),
        notes=tuple(plan.notes),
    )


def _check_members(reader: ArchiveReader, progress: Progress) -> None:
    total = sum(m.bytes for m in reader.manifest.members.values())
    progress.begin("check archive", total)
    reader.check_members(lambda _name, size: progress.advance(size))
    progress.end()


# -- the target's state


@dataclass
class _TargetState:
    tables: list[str]
    holding: list[str]
    revision: str | None


def _state(engine: Engine, conn: sa.Connection, version_table: str) -> _TargetState:
    tables = engine.tables(conn)
    holding = [t for t in tables if t != version_table and engine.has_rows(conn, t)]
    revision = None
    if version_table in tables:
        heads = conn.exec_driver_sql(
            f"SELECT version_num FROM {engine.quote(conn, version_table)}"  # noqa: S608
        ).scalars()
        revision = ",".join(sorted(str(h) for h in heads)) or None
    return _TargetState(tables, holding, revision)


def _refuse(engine: Engine, state: _TargetState, archive_revision: str | None) -> None:
    """Raise :class:`TargetNotEmptyError` unless the target may be restored into
    without ``force``; return normally when it is empty, or holds only empty tables
    at the archive's revision (they are reused)."""
    if not state.tables:
        return
    if state.holding:
        shown = ", ".join(state.holding[:5]) + (" ..." if len(state.holding) > 5 else "")
        raise TargetNotEmptyError(
            f"the target database {engine.masked_url} is not empty: table(s) {shown} hold "
            "rows. Restore into an empty database, or pass --force to drop every table in it "
            "first (its current data is then lost)"
        )
    if state.revision != archive_revision:
        raise TargetNotEmptyError(
            f"the target database {engine.masked_url} already has tables "
            f"({', '.join(state.tables[:5])}) at schema revision {state.revision or 'none'}, "
            f"the archive is at {archive_revision or 'none'}: restore into an empty database, "
            "or pass --force to drop them first"
        )


# -- logical


def _restore_logical(
    engine: Engine,
    reader: ArchiveReader,
    plan: SchemaPlan,
    version_table: str,
    *,
    force: bool,
    progress: Progress,
) -> tuple[list[TableCheck], Literal["migrations", "archive", "existing"], str | None]:
    manifest = reader.manifest
    writer = engine.writer() if isinstance(engine, SQLite) else engine
    try:
        with writer.engine().connect() as conn:
            trans = conn.begin()
            state = _state(writer, conn, version_table)
            try:
                if not force:
                    _refuse(engine, state, plan.revision)
                elif state.tables:
                    writer.drop_all(conn, state.tables)
                reuse = bool(state.tables) and not force
                schema: Literal["migrations", "archive", "existing"] = (
                    "existing" if reuse else "migrations" if plan.folder else "archive"
                )
                if not reuse:
                    _make_schema(writer, conn, manifest, plan, version_table)
                target = _reflect(writer, conn, manifest.tables)
                with writer.loading(conn):
                    for entry in manifest.tables:
                        _load_table(writer, conn, reader, entry, target, progress=progress)
                writer.reset_sequences(conn, list(target.tables.values()))
                checks = verify_target(writer, conn, manifest.tables, target, progress)
                trans.commit()
            except BaseException:
                trans.rollback()
                if engine.name == "mysql":
                    _drop_created(writer, conn, set() if force else set(state.tables))
                raise
    finally:
        writer.dispose()
    revision = plan.revision if not reuse else state.revision
    return checks, schema, revision


def _drop_created(engine: Engine, conn: sa.Connection, keep: set[str]) -> None:
    """MariaDB/MySQL committed the DDL by itself: drop what the restore created."""
    try:
        engine.drop_all(conn, [t for t in engine.tables(conn) if t not in keep])
        conn.commit()
    except sa.exc.DBAPIError as exc:  # the error that made the restore fail is the one raised
        log.warning(
            "the failed restore into %s could not drop the tables it made: %s",
            engine.masked_url,
            exc.orig,
        )


def _make_schema(
    engine: Engine,
    conn: sa.Connection,
    manifest: Manifest,
    plan: SchemaPlan,
    version_table: str,
) -> None:
    if plan.folder is not None and plan.revision is not None:
        config = alembic._config(plan.folder, version_table)
        try:
            alembic._migrate(conn, config, "upgrade", plan.revision)
        except MigrationError as exc:
            raise BackupError(
                f"running {plan.folder} up to the archive's revision {plan.revision} failed: {exc}"
            ) from exc
    present = set(engine.tables(conn))
    missing = [t for t in manifest.tables if t.name not in present]
    if missing:
        metadata = sa.MetaData()
        wanted = {t.name for t in missing}
        referred = {fk.table for t in missing for fk in t.foreign_keys} - wanted
        existing = [name for name in referred if name in present]
        if existing:
            metadata.reflect(bind=conn, only=existing)
        tables = [build_table(entry, metadata) for entry in missing]
        metadata.create_all(conn, tables=tables)
    if plan.folder is None and plan.revision is not None and version_table not in present:
        stamp = sa.Table(
            version_table,
            sa.MetaData(),
            sa.Column("version_num", sa.String(32), primary_key=True),
        )
        stamp.create(conn)
        conn.execute(stamp.insert(), [{"version_num": r} for r in plan.revision.split(",") if r])


def _reflect(engine: Engine, conn: sa.Connection, entries: Sequence[TableEntry]) -> sa.MetaData:
    """The target's tables of ``entries`` that exist."""
    present = set(engine.tables(conn))
    metadata = sa.MetaData()
    metadata.reflect(bind=conn, only=[t.name for t in entries if t.name in present])
    return metadata


def _target_columns(engine: Engine, conn: sa.Connection, table: sa.Table) -> dict[str, ColumnEntry]:
    described = describe_table(table, conn.dialect, engine.column_overrides(conn, table.name))
    return {c.name: c for c in described["columns"]}


def _coerce(source: ColumnEntry, target: ColumnEntry) -> Converter | None:
    """A Python value of the archive's type -> one of the target column's type."""
    a, t = source.type, target.type
    textual = ("string", "text", "other")
    if a == t or (a in textual and t in textual):
        return None
    if t in textual:
        if a == "json":
            return lambda v: json.dumps(v, ensure_ascii=False)
        if a == "uuid" and target.length == 32:
            return lambda v: uuid.UUID(v).hex  # SQLAlchemy's Uuid without a native type
        if a in ("datetime", "date", "time"):
            return lambda v: v.isoformat()
        if a == "bytes":
            return lambda v: v.decode("utf-8")
        return str
    if a in textual and t == "json":
        return json.loads
    conversions: dict[str, Converter] = {
        "boolean": bool,
        "integer": int,
        "float": float,
        "decimal": lambda v: v if isinstance(v, Decimal) else Decimal(repr(v)),
    }
    return conversions.get(t)


def _compose(*funcs: Converter | None) -> Converter | None:
    chain = [f for f in funcs if f is not None]
    if not chain:
        return None
    if len(chain) == 1:
        return chain[0]

    def run(value: Any) -> Any:
        for func in chain:
            value = func(value)
        return value

    return run


def _load_table(
    engine: Engine,
    conn: sa.Connection,
    reader: ArchiveReader,
    entry: TableEntry,
    metadata: sa.MetaData,
    *,
    progress: Progress,
) -> None:
    table = metadata.tables.get(entry.name)
    if table is None:
        raise IncompatibleArchiveError(
            f"table {entry.name} of the archive is not in the target's schema: restore into "
            "an empty database, or pass --force"
        )
    target = _target_columns(engine, conn, table)
    lacking = [c.name for c in entry.columns if c.name not in target]
    if lacking:
        raise IncompatibleArchiveError(
            f"table {entry.name}: the archive has column(s) {', '.join(lacking)}, which the "
            "target's schema lacks: its migrations do not make the schema the archive was "
            "taken with"
        )
    convert = [
        _compose(decoder(c), _coerce(c, target[c.name]), engine.binder(target[c.name]))
        for c in entry.columns
    ]
    row = row_converter(convert)
    width = len(entry.columns)
    digest = Digest()
    loads = json.loads
    member = entry.member
    if member is None:
        raise ArchiveError(f"table {entry.name} has no rows member in {reader.path}")

    def rows() -> Iterator[list[Any]]:
        for number, line in enumerate(reader.lines(member), start=1):
            try:
                values = loads(line)
            except ValueError:
                raise ArchiveError(f"{reader.path}: {member} line {number} is not JSON") from None
            if not isinstance(values, list) or len(values) != width:
                raise ArchiveError(
                    f"{reader.path}: {member} line {number} does not hold {width} values"
                )
            digest.add(line)
            try:
                converted = row(values)
            except (ValueError, TypeError, ArithmeticError, binascii.Error):
                raise _bad_value(
                    reader.path, f"{member} line {number}", entry, convert, values
                ) from None
            yield converted
            if number % 1000 == 0:
                progress.advance(1000)

    progress.begin(f"load {entry.name}", entry.rows)
    engine.load(conn, entry.name, [c.name for c in entry.columns], rows())
    progress.advance(digest.rows % 1000)
    progress.end()
    if digest.rows != entry.rows or digest.hexdigest() != entry.digest:
        raise rows_altered(
            reader.path, entry.name, digest.rows, digest.hexdigest() == entry.digest, entry.rows
        )


def _bad_value(
    path: Path,
    where: str,
    entry: TableEntry,
    convert: Sequence[Converter | None],
    values: list[Any],
) -> ArchiveError:
    """The error for a line whose value does not decode: found again column by column."""
    for column, func, value in zip(entry.columns, convert, values, strict=True):
        if func is None or value is None:
            continue
        try:
            func(value)
        except (ValueError, TypeError, ArithmeticError, binascii.Error) as exc:
            return ArchiveError(
                f"{path}: {where}, column {column.name}: {value!r} is not a valid "
                f"{column.type} ({exc})"
            )
    return ArchiveError(f"{path}: {where} does not decode")


def verify_target(
    engine: Engine,
    conn: sa.Connection,
    entries: Sequence[TableEntry],
    metadata: sa.MetaData,
    progress: Progress | None = None,
) -> list[TableCheck]:
    """Read every table of ``entries`` back from the target and compare its row count
    and checksum with the archive's; raises :class:`RestoreVerificationError` naming
    each table that differs."""
    progress = progress or NullProgress()
    checks = []
    wrong = []
    for entry in entries:
        table = metadata.tables.get(entry.name)
        if table is None:
            wrong.append(f"{entry.name}: missing")
            continue
        target = _target_columns(engine, conn, table)
        select_columns = [target[c.name] for c in entry.columns]
        sql = engine.select_sql(conn, entry.name, select_columns, ())
        values = row_encoder(entry.columns)
        line = json_line_encoder(entry.columns)
        digest = Digest()
        progress.begin(f"verify {entry.name}", entry.rows)
        for rows in engine.stream(conn, sql):
            for row in rows:
                digest.add(line(values(row)))
            progress.advance(len(rows))
        progress.end()
        found = digest.hexdigest()
        checks.append(TableCheck(entry.name, digest.rows, found))
        if digest.rows != entry.rows:
            wrong.append(f"{entry.name}: {digest.rows} rows, the archive has {entry.rows}")
        elif found != entry.digest:
            wrong.append(
                f"{entry.name}: the rows' checksum differs (same count, {entry.rows}): a "
                "column of the target keeps less than the source did (precision, time zone, "
                "length)"
            )
    if wrong:
        raise RestoreVerificationError(
            "the restored data does not match the archive: " + "; ".join(wrong)
        )
    return checks


# -- native


def _restore_native(
    engine: Engine,
    reader: ArchiveReader,
    version_table: str,
    *,
    force: bool,
    progress: Progress,
) -> tuple[list[TableCheck], Literal["native"]]:
    manifest = reader.manifest
    native = manifest.native
    if native is None:
        raise ArchiveError(f"{reader.path} says it is native but holds no native dump")
    with tempfile.TemporaryDirectory(prefix="meshgate-restore-") as tmp:
        dump = reader.extract(native.member, Path(tmp) / Path(native.member).name)
        if isinstance(engine, SQLite):
            # The dump is a database: prove it before the target is touched.
            copy = SQLite(sa.engine.make_url(f"sqlite:///{dump}"))
            try:
                with copy.engine().connect() as conn:
                    metadata = _reflect(copy, conn, manifest.tables)
                    verify_target(copy, conn, manifest.tables, metadata, progress)
            except RestoreVerificationError as exc:
                raise ArchiveError(f"{reader.path}: the native dump was altered: {exc}") from None
            finally:
                copy.dispose()
        with engine.engine().connect() as conn:
            state = _state(engine, conn, version_table)
            conn.rollback()
        if state.tables and not force:
            raise TargetNotEmptyError(
                f"the target database {engine.masked_url} is not empty (tables "
                f"{', '.join(state.tables[:5])}): a native dump restores into an empty "
                "database only; use an empty one, or pass --force to replace what the dump holds"
            )
        engine.dispose()
        progress.begin(f"native restore ({native.tool})", None)
        engine.native_restore(engine.url, dump, native, force=force)
        progress.end()
    with engine.engine().connect() as conn:
        metadata = _reflect(engine, conn, manifest.tables)
        try:
            checks = verify_target(engine, conn, manifest.tables, metadata, progress)
        except RestoreVerificationError as exc:
            raise RestoreVerificationError(
                f"{exc} (the native restore has committed: the target holds the dump as it loaded)"
            ) from None
        conn.rollback()
    return checks, "native"
