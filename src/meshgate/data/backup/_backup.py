"""``backup``: a consistent snapshot of a service's database into an archive."""

from __future__ import annotations

import contextlib
import re
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import sqlalchemy as sa

from meshgate import __version__
from meshgate.data.backup._revisions import lineage
from meshgate.data.backup.archive import ArchiveWriter
from meshgate.data.backup.codec import Digest, json_line_encoder, row_encoder
from meshgate.data.backup.engines import Engine, open_engine
from meshgate.data.backup.engines.base import Snapshot, database_errors
from meshgate.data.backup.errors import BackupError
from meshgate.data.backup.manifest import (
    ColumnEntry,
    Manifest,
    MigrationsEntry,
    OutboxEntry,
    ServiceEntry,
    SnapshotEntry,
    SourceEntry,
    TableEntry,
)
from meshgate.data.backup.progress import NullProgress, Progress
from meshgate.data.backup.schema import describe_table, sorted_tables
from meshgate.data.migrations import VERSION_TABLE

if TYPE_CHECKING:
    from meshgate.data import Database

__all__ = ["OUTBOX_TABLES", "Method", "backup", "default_archive_name"]

Method = Literal["logical", "native", "auto"]
"""``logical``: the portable rows (any engine restores them); ``native``: the engine's
own dump of the same snapshot, plus the checksums; ``auto``: native when the tools
are installed, else logical."""

OUTBOX_TABLES = ("meshgate_outbox", "outbox")
"""Table names taken for the service's transactional outbox (also ``*_outbox``)."""

_SAFE_RE = re.compile(r"[^A-Za-z0-9_.-]+")


def default_archive_name(service: str, when: datetime | None = None) -> str:
    """``users-20250131T120000Z.mgbak``."""
    stamp = (when or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    name = _SAFE_RE.sub("-", service.partition(":")[0]).strip("-.") or "service"
    return f"{name}-{stamp}.mgbak"


def backup(
    database: str | Database,
    path: str | Path,
    *,
    service: str = "default",
    service_ref: str | None = None,
    migrations: str | Path | None = None,
    version_table: str = VERSION_TABLE,
    method: Method = "logical",
    compresslevel: int = 6,
    progress: Progress | None = None,
) -> Manifest:
    """Back the database up into the archive ``path`` and return its manifest.

    The whole database (every base table) is read in one consistent snapshot while
    the service keeps writing (see docs/backup.md for each engine). ``migrations``
    (the service's folder) lets the manifest record the revision's history, which
    tells a later restore a newer schema from another service's.

    Raises :class:`~meshgate.data.backup.errors.BackupError` (a database that cannot
    be reached or fails, a native tool missing or failing, a file that cannot be
    written) and :class:`~meshgate.errors.ConfigError` for a bad URL. Nothing is left
    at ``path`` when it fails.
    """
    started = time.perf_counter()
    progress = progress or NullProgress()
    target = Path(path)
    if target.is_dir():
        target = target / default_archive_name(service)
    if not target.parent.is_dir():
        raise BackupError(
            f"cannot write the archive {target}: the folder {target.parent} does not exist; "
            "create it, or choose another path (-o)"
        )
    engine = open_engine(database)
    native = method == "native" or (method == "auto" and not engine.missing_tools())
    if native and engine.name != "sqlite":
        engine.need_tools()
    folder = Path(migrations) if migrations is not None else None
    try:
        with (
            tempfile.TemporaryDirectory(prefix="meshgate-backup-", dir=target.parent) as tmp,
            ArchiveWriter(target, compresslevel=compresslevel) as out,
        ):
            with (
                database_errors(engine, "backup"),
                engine.snapshot(Path(tmp), native=native) as snap,
            ):
                if native and snap.native is None:
                    raise BackupError(
                        f"a native backup of {snap.engine} cannot share the snapshot with "
                        "its dump tool: use --method logical"
                    )
                # A native archive holds the tool's dump; the rows are still read, for
                # the checksums, but not written twice.
                body = _dump(engine, snap, None if native else out, version_table, progress)
                native_entry = None
                if snap.native is not None:
                    progress.begin(f"native dump ({snap.engine})", None)
                    dump = snap.native(Path(tmp))
                    out.add_file(dump.entry.member, dump.path)
                    native_entry = dump.entry
                    progress.end()
            revision, tables, outbox = body
            manifest = Manifest(
                meshgate_version=__version__,
                created_at=datetime.now(UTC),
                service=ServiceEntry(name=service, ref=service_ref or service),
                method="native" if native_entry is not None else "logical",
                source=SourceEntry(
                    engine=snap.engine,
                    version=snap.version,
                    database=engine.database,
                    url=engine.masked_url,
                ),
                snapshot=SnapshotEntry(
                    taken_at=snap.taken_at,
                    method=snap.method,
                    position=snap.position,
                    notes=tuple(snap.notes),
                ),
                migrations=MigrationsEntry(
                    revision=revision,
                    version_table=version_table,
                    lineage=lineage(folder, revision),
                ),
                outbox=outbox,
                tables=tuple(tables),
                members=dict(out.members),
                native=native_entry,
                rows=sum(t.rows for t in tables),
                bytes=sum(m.bytes for m in out.members.values()),
                duration_s=round(time.perf_counter() - started, 3),
            )
            out.close(manifest)
    except OSError as exc:
        raise BackupError(f"cannot write the archive {target}: {exc}") from exc
    finally:
        engine.dispose()
    return manifest


def _dump(
    engine: Engine,
    snap: Snapshot,
    out: ArchiveWriter | None,
    version_table: str,
    progress: Progress,
) -> tuple[str | None, list[TableEntry], OutboxEntry | None]:
    conn = snap.conn
    names = engine.tables(conn)
    revision = None
    if version_table in names:
        names.remove(version_table)
        heads = conn.exec_driver_sql(
            f"SELECT version_num FROM {engine.quote(conn, version_table)}"  # noqa: S608
        ).scalars()
        revision = ",".join(sorted(str(h) for h in heads)) or None
    metadata = sa.MetaData()
    if names:
        metadata.reflect(bind=conn, only=names)
    tables: list[TableEntry] = []
    for index, table in enumerate(sorted_tables(list(metadata.tables.values())), start=1):
        described = describe_table(table, conn.dialect, engine.column_overrides(conn, table.name))
        member = None
        if out is not None:
            member = f"tables/{index:04d}-{_SAFE_RE.sub('_', table.name)[:60]}.jsonl"
        columns: Sequence[ColumnEntry] = described["columns"]
        progress.begin(f"table {table.name}", engine.estimate_rows(conn, table.name))
        digest = _write_rows(
            engine,
            conn,
            table=table.name,
            columns=columns,
            primary_key=described["primary_key"],
            out=out,
            member=member,
            progress=progress,
        )
        progress.end()
        tables.append(
            TableEntry(**described, rows=digest.rows, digest=digest.hexdigest(), member=member)
        )
    return revision, tables, _outbox(engine, conn, tables)


def _write_rows(
    engine: Engine,
    conn: sa.Connection,
    *,
    table: str,
    columns: Sequence[ColumnEntry],
    primary_key: Sequence[str],
    out: ArchiveWriter | None,
    member: str | None,
    progress: Progress,
) -> Digest:
    values = row_encoder(columns)
    line = json_line_encoder(columns)
    digest = Digest()
    add = digest.add
    sql = engine.select_sql(conn, table, columns, primary_key)
    with contextlib.ExitStack() as stack:
        writer = stack.enter_context(out.member(member)) if out and member else None
        for rows in engine.stream(conn, sql):
            lines = []
            for row in rows:
                try:
                    encoded = line(values(row))
                except (ValueError, TypeError, ArithmeticError) as exc:
                    raise BackupError(
                        f"table {table}: cannot encode a row ({exc}); its columns are "
                        + ", ".join(f"{c.name} ({c.type})" for c in columns)
                    ) from exc
                add(encoded)
                lines.append(encoded)
            if writer is not None:
                lines.append(b"")
                writer.write(b"\n".join(lines))
            progress.advance(len(rows))
    return digest


def _outbox(
    engine: Engine, conn: sa.Connection, tables: Sequence[TableEntry]
) -> OutboxEntry | None:
    by_name = {t.name: t for t in tables}
    names = [n for n in OUTBOX_TABLES if n in by_name]
    names += sorted(n for n in by_name if n.endswith("_outbox") and n not in names)
    for name in names:
        entry = by_name[name]
        ints = {c.name for c in entry.columns if c.type == "integer"}
        pk = entry.primary_key
        column = pk[0] if len(pk) == 1 and pk[0] in ints else ("id" if "id" in ints else None)
        if column is not None:
            return OutboxEntry(
                table=name, column=column, position=engine.outbox_position(conn, name, column)
            )
    return None
