"""MariaDB and MySQL through PyMySQL.

The snapshot is one ``REPEATABLE READ`` transaction started ``WITH CONSISTENT
SNAPSHOT``: InnoDB tables are read as of that instant while writers go on. Tables of
a non-transactional engine (MyISAM, Aria) are not covered by any snapshot: the
manifest names them in its notes. Rows stream through an unbuffered (server-side)
cursor. JSON columns, which MariaDB keeps as LONGTEXT with a ``json_valid`` check,
are recognised by that check; ``TINYINT(1)`` is a boolean, as SQLAlchemy makes it.

A native backup runs ``mariadb-dump --single-transaction`` on the same snapshot: our
transaction and the dump's are both opened under ``FLUSH TABLES WITH READ LOCK``
(no commit can happen in between), which is released as soon as the dump's
transaction shows in ``information_schema.INNODB_TRX`` (its connection is found by
its TCP port, through /proc: Linux only). Writers wait for that instant, typically
tens of milliseconds; it needs the RELOAD privilege.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL

from meshgate.data.backup.codec import Converter
from meshgate.data.backup.engines.base import BATCH, Engine, NativeDump, Snapshot
from meshgate.data.backup.errors import IncompatibleArchiveError, NativeToolError
from meshgate.data.backup.manifest import ColumnEntry, LogicalType, NativeEntry

__all__ = ["MySQL"]

LOCK_WAIT = 10
"""Seconds a native backup waits for the global read lock (running statements end)."""
DUMP_START_TIMEOUT = 30.0
"""Seconds a native backup waits for mariadb-dump to open its snapshot."""

_JSON_CHECK_RE = re.compile(r"^\s*json_valid\(`((?:[^`]|``)+)`\)\s*$", re.IGNORECASE)


class MySQL(Engine):
    name = "mysql"
    driver = "pymysql"
    extra = "mysql"
    native_tools: ClassVar[tuple[str, ...]] = ("mariadb-dump", "mariadb")
    paramstyle_mark = "%s"

    def tool_package(self) -> str:
        return "mariadb-client (apt-get install mariadb-client)"

    def setup(self, engine: sa.Engine) -> None:
        @event.listens_for(engine, "connect")
        def _connect(dbapi_connection: Any, _record: Any) -> None:
            with dbapi_connection.cursor() as cursor:
                # Timestamps read and written as UTC, whatever the server's zone.
                cursor.execute("SET SESSION time_zone = '+00:00'")

    @contextmanager
    def snapshot(self, workdir: Path, *, native: bool = False) -> Iterator[Snapshot]:
        if native:
            self.need_tools()
            if not Path("/proc/net/tcp").is_file():
                raise NativeToolError(
                    "a native MariaDB backup finds its dump's connection through /proc (Linux): "
                    "use --method logical here"
                )
        with self.engine().connect() as conn:
            version = str(conn.exec_driver_sql("SELECT VERSION()").scalar())
            mariadb = "mariadb" in version.lower()
            conn.exec_driver_sql("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            locked = False
            dump: _Dump | None = None
            try:
                if native:
                    locked = _global_read_lock(conn)
                conn.exec_driver_sql("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY")
                taken = datetime.now(UTC)
                position: dict[str, str | int | None] = {}
                if mariadb:
                    gtid = conn.exec_driver_sql("SELECT @@gtid_current_pos").scalar()
                    position["gtid_current_pos"] = str(gtid or "") or None
                    # MariaDB gives the binlog position that matches the snapshot.
                    status: dict[str, Any] = dict(
                        conn.exec_driver_sql(
                            "SHOW STATUS WHERE Variable_name IN "
                            "('binlog_snapshot_file', 'binlog_snapshot_position')"
                        ).all()
                    )
                    if status.get("binlog_snapshot_file"):
                        position["binlog_file"] = str(status["binlog_snapshot_file"])
                        position["binlog_position"] = int(status["binlog_snapshot_position"])
                else:
                    gtid = conn.exec_driver_sql("SELECT @@global.gtid_executed").scalar()
                    position["gtid_executed"] = str(gtid or "") or None
                notes = [
                    f"table {name} uses the {engine} engine, which has no snapshots: its rows "
                    "may be from a slightly different instant"
                    for name, engine in conn.exec_driver_sql(
                        "SELECT TABLE_NAME, ENGINE FROM information_schema.TABLES "
                        "WHERE TABLE_SCHEMA = DATABASE() AND TABLE_TYPE = 'BASE TABLE' "
                        "AND ENGINE <> 'InnoDB' ORDER BY 1"
                    )
                ]
                snapshot = Snapshot(
                    conn=conn,
                    taken_at=taken,
                    method="one REPEATABLE READ transaction WITH CONSISTENT SNAPSHOT (InnoDB)",
                    version=version,
                    engine="mariadb" if mariadb else "mysql",
                    position=position,
                    notes=notes,
                )
                if native:
                    dump = _Dump(self, workdir)
                    # No commit can happen under the global read lock: the dump's
                    # snapshot, opened now, is the same as ours.
                    dump.wait_for_snapshot(conn)
                    conn.exec_driver_sql("UNLOCK TABLES")
                    locked = False
                    snapshot.method += (
                        f"; {self.native_tools[0]} --single-transaction opened the same snapshot "
                        "under a global read lock held for "
                        f"{(datetime.now(UTC) - taken).total_seconds() * 1000:.0f} ms"
                    )
                    snapshot.native = dump.finish
                yield snapshot
            finally:
                if locked:
                    conn.exec_driver_sql("UNLOCK TABLES")
                if dump is not None:
                    dump.stop()
                conn.rollback()

    def tables(self, conn: sa.Connection) -> list[str]:
        rows = conn.exec_driver_sql(
            "SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE() "
            "AND TABLE_TYPE = 'BASE TABLE' ORDER BY 1"
        )
        return [str(r[0]) for r in rows]

    def column_overrides(self, conn: sa.Connection, table: str) -> Mapping[str, LogicalType]:
        try:
            rows = conn.exec_driver_sql(
                "SELECT CHECK_CLAUSE FROM information_schema.CHECK_CONSTRAINTS "
                "WHERE CONSTRAINT_SCHEMA = DATABASE() AND TABLE_NAME = %s",
                (table,),
            ).all()
        except sa.exc.DBAPIError:
            return {}  # MySQL 8 has a real JSON type and no TABLE_NAME here
        found: dict[str, LogicalType] = {}
        for (clause,) in rows:
            match = _JSON_CHECK_RE.match(str(clause))
            if match:
                found[match.group(1).replace("``", "`")] = "json"
        return found

    def estimate_rows(self, conn: sa.Connection, table: str) -> int | None:
        value = conn.exec_driver_sql(
            "SELECT TABLE_ROWS FROM information_schema.TABLES "
            "WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = %s",
            (table,),
        ).scalar()
        return int(value) if value is not None else None

    def stream(self, conn: sa.Connection, sql: str, batch: int = BATCH) -> Iterator[Sequence[Any]]:
        import pymysql.cursors  # type: ignore[import-untyped]  # noqa: PLC0415 - an extra

        dbapi = conn.connection.dbapi_connection
        cursor = pymysql.cursors.SSCursor(dbapi)
        try:
            cursor.execute(sql)
            while rows := cursor.fetchmany(batch):
                yield list(rows)
        finally:
            cursor.close()

    def drop_all(self, conn: sa.Connection, tables: Sequence[str]) -> None:
        conn.exec_driver_sql("SET SESSION foreign_key_checks = 0")
        try:
            views = [
                str(r[0])
                for r in conn.exec_driver_sql(
                    "SELECT TABLE_NAME FROM information_schema.VIEWS "
                    "WHERE TABLE_SCHEMA = DATABASE()"
                )
            ]
            if views:
                conn.exec_driver_sql(
                    "DROP VIEW IF EXISTS " + ", ".join(self.quote(conn, v) for v in views)
                )
            if tables:
                conn.exec_driver_sql(
                    "DROP TABLE IF EXISTS " + ", ".join(self.quote(conn, t) for t in tables)
                )
        finally:
            conn.exec_driver_sql("SET SESSION foreign_key_checks = 1")

    @contextmanager
    def loading(self, conn: sa.Connection) -> Iterator[None]:
        conn.exec_driver_sql("SET SESSION foreign_key_checks = 0")
        try:
            yield
        finally:
            conn.exec_driver_sql("SET SESSION foreign_key_checks = 1")

    def native_restore(self, conn_url: URL, dump: Path, entry: NativeEntry, *, force: bool) -> None:
        self.need_tools()
        if entry.format != "mariadb-dump-sql":
            raise IncompatibleArchiveError(f"a {entry.format} dump cannot be restored into MariaDB")
        with _defaults_file(conn_url) as defaults, dump.open("rb") as sql:
            # The program is fixed; the arguments come from the service's database URL.
            done = subprocess.run(  # noqa: S603
                [
                    self.native_tools[1],
                    f"--defaults-extra-file={defaults}",
                    *_connection_args(conn_url),
                    "--binary-mode",
                    conn_url.database or "",
                ],
                stdin=sql,
                capture_output=True,
                check=False,
            )
        if done.returncode != 0:
            raise NativeToolError(
                f"{self.native_tools[1]} exited with {done.returncode} while loading the dump: "
                f"{done.stderr.decode(errors='replace').strip()[-2000:]}"
            )

    def binder(self, column: ColumnEntry) -> Converter | None:
        if column.type == "json":
            return lambda v: json.dumps(v, ensure_ascii=False)
        if column.type == "boolean":
            return int
        if column.type == "uuid":
            return str
        return None


# -- the native dump


def _global_read_lock(conn: sa.Connection) -> bool:
    conn.exec_driver_sql(f"SET SESSION lock_wait_timeout = {LOCK_WAIT}")
    try:
        conn.exec_driver_sql("FLUSH TABLES WITH READ LOCK")
    except sa.exc.DBAPIError as exc:
        raise NativeToolError(
            "a native MariaDB backup aligns its snapshot with mariadb-dump's under FLUSH TABLES "
            f"WITH READ LOCK, which failed ({exc.orig}): it needs the RELOAD privilege, and no "
            f"statement running longer than {LOCK_WAIT} s. Use --method logical"
        ) from exc
    return True


def _connection_args(url: URL) -> list[str]:
    return [
        "--protocol=TCP",
        f"--host={url.host or '127.0.0.1'}",
        f"--port={url.port or 3306}",
        f"--user={url.username or ''}",
    ]


@contextmanager
def _defaults_file(url: URL) -> Iterator[Path]:
    """An option file with the password: never on the command line, where ps shows it."""
    path = _write_defaults(url)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def _write_defaults(url: URL) -> Path:
    fd, name = tempfile.mkstemp(prefix="meshgate-my-", suffix=".cnf")  # mode 0600
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write("[client]\n")
        if url.password is not None:
            escaped = str(url.password).replace("\\", "\\\\").replace('"', '\\"')
            out.write(f'password="{escaped}"\n')
    return Path(name)


def _local_ports(pid: int) -> set[int]:
    """The local ports of the TCP sockets of process ``pid`` (Linux /proc)."""
    inodes = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    except OSError:
        return set()
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table, encoding="ascii") as lines:
            next(lines, None)
            for line in lines:
                fields = line.split()
                if len(fields) > 9 and fields[9] in inodes:
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


class _Dump:
    """A running mariadb-dump of the engine's database into ``workdir``."""

    def __init__(self, engine: MySQL, workdir: Path) -> None:
        self.path = workdir / "mariadb-dump.sql"
        self._defaults = defaults = _write_defaults(engine.url)
        self.tool = engine.native_tools[0]
        # The program is fixed; the arguments come from the service's database URL.
        self.process = subprocess.Popen(  # noqa: S603
            [
                self.tool,
                f"--defaults-extra-file={defaults}",
                *_connection_args(engine.url),
                "--single-transaction",
                "--skip-lock-tables",
                "--hex-blob",
                "--routines",
                "--triggers",
                "--no-tablespaces",
                "--default-character-set=utf8mb4",
                "--skip-dump-date",
                f"--result-file={self.path}",
                engine.url.database or "",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def wait_for_snapshot(self, conn: sa.Connection) -> None:
        """Return once the dump's transaction has opened its snapshot (or it ended)."""
        deadline = time.monotonic() + DUMP_START_TIMEOUT
        thread: int | None = None
        while self.process.poll() is None:
            if thread is None:
                for port in _local_ports(self.process.pid):
                    found = conn.exec_driver_sql(
                        "SELECT ID FROM information_schema.PROCESSLIST WHERE HOST LIKE %s",
                        (f"%:{port}",),
                    ).scalar()
                    if found is not None:
                        thread = int(found)
            if (
                thread is not None
                and conn.exec_driver_sql(
                    "SELECT 1 FROM information_schema.INNODB_TRX WHERE trx_mysql_thread_id = %s",
                    (thread,),
                ).first()
            ):
                return
            if time.monotonic() > deadline:
                raise NativeToolError(
                    f"{self.tool} did not open its snapshot within {DUMP_START_TIMEOUT:g} s"
                )
            time.sleep(0.002)

    def finish(self, _folder: Path) -> NativeDump:
        _, stderr = self.process.communicate()
        self._defaults.unlink(missing_ok=True)
        if self.process.returncode != 0:
            raise NativeToolError(
                f"{self.tool} exited with {self.process.returncode}: "
                f"{stderr.decode(errors='replace').strip()[-2000:]}"
            )
        version = subprocess.run(  # noqa: S603 - a fixed program
            [self.tool, "--version"], capture_output=True, text=True, check=False
        ).stdout.strip()
        entry = NativeEntry(
            tool=self.tool,
            version=version,
            member="native/mariadb-dump.sql",
            format="mariadb-dump-sql",
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
        self._defaults.unlink(missing_ok=True)
