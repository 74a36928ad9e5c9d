"""PostgreSQL through psycopg.

The snapshot is one ``REPEATABLE READ, READ ONLY`` transaction: every table is read
as of its first statement, while writers go on. A native backup runs ``pg_dump
--snapshot`` on that same snapshot (exported with ``pg_export_snapshot()``), so the
dump and the manifest's checksums stand for the same instant. Restore loads with
``COPY`` and moves serial and identity sequences past the restored ids.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import sqlalchemy as sa
from sqlalchemy.engine import URL

from meshgate.data.backup.codec import Converter
from meshgate.data.backup.engines.base import BATCH, Engine, NativeDump, Snapshot
from meshgate.data.backup.errors import NativeToolError
from meshgate.data.backup.manifest import ColumnEntry, NativeEntry

__all__ = ["PostgreSQL", "libpq_env"]


def libpq_env(url: URL) -> tuple[list[str], dict[str, str]]:
    """Connection arguments for pg_dump/pg_restore/psql, with the password in the
    environment (never on the command line, where ``ps`` shows it)."""
    env = dict(os.environ)
    args = []
    if url.host:
        args += ["--host", url.host]
    if url.port:
        args += ["--port", str(url.port)]
    if url.username:
        args += ["--username", url.username]
    if url.password is not None:
        env["PGPASSWORD"] = str(url.password)
    args += ["--dbname", url.database or ""]
    return args, env


def _run(cmd: list[str], env: dict[str, str], what: str) -> str:
    try:
        # The programs are fixed; the arguments come from the service's database URL.
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)  # noqa: S603
    except OSError as exc:
        raise NativeToolError(f"{what}: cannot run {cmd[0]}: {exc}") from None
    if done.returncode != 0:
        raise NativeToolError(
            f"{what}: {cmd[0]} exited with {done.returncode}: {done.stderr.strip()[-2000:]}"
        )
    return done.stdout


def _tool_version(tool: str) -> str:
    return _run([tool, "--version"], dict(os.environ), f"{tool} --version").strip()


class PostgreSQL(Engine):
    name = "postgresql"
    driver = "psycopg"
    extra = "postgres"
    native_tools: ClassVar[tuple[str, ...]] = ("pg_dump", "pg_restore")
    paramstyle_mark = "%s"

    def tool_package(self) -> str:
        return (
            "postgresql-client (apt-get install postgresql-client), of the server's major "
            "version or newer"
        )

    @contextmanager
    def snapshot(self, workdir: Path, *, native: bool = False) -> Iterator[Snapshot]:
        with self.engine().connect() as raw:
            conn = raw.execution_options(
                isolation_level="REPEATABLE READ", postgresql_readonly=True
            )
            trans = conn.begin()
            try:
                conn.exec_driver_sql("SET LOCAL TIME ZONE 'UTC'")
                version, version_num, recovery = conn.exec_driver_sql(
                    "SELECT current_setting('server_version'), "
                    "current_setting('server_version_num')::int, pg_is_in_recovery()"
                ).one()
                snap_fn = (
                    "pg_current_snapshot" if version_num >= 130000 else "txid_current_snapshot"
                )
                lsn_fn = "pg_last_wal_replay_lsn" if recovery else "pg_current_wal_lsn"
                # The snapshot was taken by the transaction's first query, just above.
                taken, txid_snapshot, lsn = conn.exec_driver_sql(
                    f"SELECT now(), {snap_fn}()::text, {lsn_fn}()::text"
                ).one()
                exported: str | None = None
                if native:
                    self.need_tools()
                    exported = conn.exec_driver_sql("SELECT pg_export_snapshot()").scalar()
                snapshot = Snapshot(
                    conn=conn,
                    taken_at=taken.astimezone(UTC) if isinstance(taken, datetime) else taken,
                    method="one REPEATABLE READ, READ ONLY transaction",
                    version=str(version),
                    engine="postgresql",
                    position={"wal_lsn": lsn, "txid_snapshot": txid_snapshot},
                )
                dump = None
                if exported is not None:
                    # It runs beside the checksums' reading, on the same snapshot.
                    dump = _Dump(self.url, workdir, exported)
                    snapshot.native = dump.finish
                try:
                    yield snapshot
                finally:
                    if dump is not None:
                        dump.stop()
            finally:
                trans.rollback()

    def tables(self, conn: sa.Connection) -> list[str]:
        rows = conn.exec_driver_sql(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p') "
            "AND NOT c.relispartition ORDER BY 1"
        )
        return [r[0] for r in rows]

    def estimate_rows(self, conn: sa.Connection, table: str) -> int | None:
        value = conn.exec_driver_sql(
            "SELECT reltuples::bigint FROM pg_class WHERE oid = to_regclass(%(t)s)",
            {"t": self.quote(conn, table)},
        ).scalar()
        return int(value) if value is not None and value >= 0 else None

    def select_expression(self, conn: sa.Connection, column: ColumnEntry) -> str:
        quoted = self.quote(conn, column.name)
        if column.type == "json":
            return f"{quoted}::text"  # text, as the other engines give JSON
        return quoted

    def stream(self, conn: sa.Connection, sql: str, batch: int = BATCH) -> Iterator[Sequence[Any]]:
        dbapi: Any = conn.connection.dbapi_connection
        # A named cursor is a server-side one: rows come in batches.
        cursor = dbapi.cursor(name="meshgate_backup")
        cursor.itersize = batch
        try:
            cursor.execute(sql)
            while rows := cursor.fetchmany(batch):
                yield rows
        finally:
            cursor.close()

    def drop_all(self, conn: sa.Connection, tables: Sequence[str]) -> None:
        if tables:
            names = ", ".join(self.quote(conn, t) for t in tables)
            conn.exec_driver_sql(f"DROP TABLE IF EXISTS {names} CASCADE")
        # Types and sequences of the old schema would clash with the migrations'.
        for kind, relkind in (("TYPE", None), ("SEQUENCE", "S")):
            if relkind is None:
                rows = conn.exec_driver_sql(
                    "SELECT t.typname FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace "
                    "WHERE n.nspname = current_schema() AND t.typtype IN ('e', 'd')"
                )
            else:
                rows = conn.exec_driver_sql(
                    "SELECT c.relname FROM pg_class c JOIN pg_namespace n "
                    "ON n.oid = c.relnamespace WHERE n.nspname = current_schema() "
                    "AND c.relkind = 'S'"
                )
            names = ", ".join(self.quote(conn, r[0]) for r in rows)
            if names:
                conn.exec_driver_sql(f"DROP {kind} IF EXISTS {names} CASCADE")

    @contextmanager
    def loading(self, conn: sa.Connection) -> Iterator[None]:
        # As pg_restore does: foreign keys are dropped for the load and made again
        # after it, which checks every row once (all inside the restore's transaction).
        keys = conn.exec_driver_sql(
            "SELECT c.conrelid::regclass::text, c.conname, pg_get_constraintdef(c.oid) "
            "FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace "
            "WHERE c.contype = 'f' AND n.nspname = current_schema() ORDER BY 1, 2"
        ).all()
        for table, name, _definition in keys:
            conn.exec_driver_sql(f"ALTER TABLE {table} DROP CONSTRAINT {self.quote(conn, name)}")
        yield
        for table, name, definition in keys:
            conn.exec_driver_sql(
                f"ALTER TABLE {table} ADD CONSTRAINT {self.quote(conn, name)} {definition}"
            )

    def binder(self, column: ColumnEntry) -> Converter | None:
        if column.type == "datetime" and column.timezone:
            return lambda v: v.replace(tzinfo=UTC) if v.tzinfo is None else v
        if column.type == "json":
            return _json_text
        if column.type == "uuid":
            return str
        return None

    def load(
        self,
        conn: sa.Connection,
        table: str,
        columns: Sequence[str],
        rows: Iterable[Sequence[Any]],
        batch: int = BATCH,
    ) -> None:
        dbapi: Any = conn.connection.dbapi_connection
        quoted = ", ".join(self.quote(conn, c) for c in columns)
        sql = f"COPY {self.quote(conn, table)} ({quoted}) FROM STDIN"
        with dbapi.cursor() as cursor, cursor.copy(sql) as copy:
            for row in rows:
                copy.write_row(row)

    def reset_sequences(self, conn: sa.Connection, tables: Sequence[sa.Table]) -> None:
        for table in tables:
            for column in table.columns:
                if not isinstance(column.type, sa.Integer):
                    continue
                sequence = conn.exec_driver_sql(
                    "SELECT pg_get_serial_sequence(%(t)s, %(c)s)",
                    {"t": self.quote(conn, table.name), "c": column.name},
                ).scalar()
                if sequence is None:
                    continue
                col, tab = self.quote(conn, column.name), self.quote(conn, table.name)
                conn.exec_driver_sql(
                    f"SELECT setval(%(s)s, COALESCE(MAX({col}), 1), MAX({col}) IS NOT NULL) "  # noqa: S608
                    f"FROM {tab}",
                    {"s": sequence},
                )

    def native_restore(self, conn_url: URL, dump: Path, entry: NativeEntry, *, force: bool) -> None:
        self.need_tools()
        args, env = libpq_env(conn_url)
        cmd = [
            "pg_restore",
            *args,
            "--single-transaction",
            "--no-owner",
            "--no-privileges",
            "--exit-on-error",
        ]
        if force:
            cmd += ["--clean", "--if-exists"]
        _run([*cmd, str(dump)], env, "pg_restore")


def _json_text(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


class _Dump:
    """``pg_dump --snapshot`` running into ``workdir``."""

    def __init__(self, url: URL, workdir: Path, exported: str) -> None:
        self.path = workdir / "pg_dump.custom"
        args, env = libpq_env(url)
        # The program is fixed; the arguments come from the service's database URL.
        self.process = subprocess.Popen(  # noqa: S603
            [
                shutil.which("pg_dump") or "pg_dump",
                *args,
                "--format=custom",
                "--compress=0",  # the archive compresses
                "--no-owner",
                "--no-privileges",
                f"--snapshot={exported}",
                "--file",
                str(self.path),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def finish(self, _folder: Path) -> NativeDump:
        _, stderr = self.process.communicate()
        if self.process.returncode != 0:
            raise NativeToolError(
                f"pg_dump exited with {self.process.returncode}: "
                f"{stderr.decode(errors='replace').strip()[-2000:]}"
            )
        entry = NativeEntry(
            tool="pg_dump",
            version=_tool_version("pg_dump"),
            member="native/pg_dump.custom",
            format="pg_dump-custom",
        )
        return NativeDump(path=self.path, entry=entry)

    def stop(self) -> None:
        """End the dump if it still runs (the backup failed)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
