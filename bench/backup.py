#!/usr/bin/env python3
"""Benchmark meshgate's backup and restore against each engine's own dump tool.

Run it with the project's virtualenv::

    .venv/bin/python bench/backup.py --rows 1000000 --engines sqlite,postgresql,mariadb
    .venv/bin/python bench/backup.py --rows 50000            # a quick run

For each engine it makes a fresh database (a file in a temp folder for SQLite;
``CREATE DATABASE mgbench_<hex>`` on the PostgreSQL and MariaDB servers, dropped at
the end), creates one table with the column types the SDK's models use, and fills it
with ``--rows`` rows on the server side. Then, on that same data, one after the
other, it times:

- ``meshgate logical``: ``backup()`` into a ``.mgbak`` (portable rows, deflate level
  ``--compress-level``), then ``restore()`` into a fresh database (checks the archive,
  makes the schema, loads, reads every row back to verify it);
- ``meshgate native``: ``backup(method="native")`` and its restore (the engine's tool
  on the same snapshot; restore verified the same way);
- the engine's tool alone: ``pg_dump -Fc`` / ``pg_restore``, ``mariadb-dump
  --single-transaction`` / ``mariadb``, ``sqlite3 .backup`` / copy and ``sqlite3 .dump``
  / ``sqlite3 < dump``.

Numbers: ``rows/s`` = rows / seconds; ``MB/s`` = the table's size in the database
(PostgreSQL ``pg_total_relation_size``, MariaDB data + index length, the SQLite
file) / seconds, so that every tool is measured against the same amount of data;
``out MB`` is the size of what the tool wrote. The restore of meshgate is also split
into its phases (archive check, load, verify), from its progress callbacks.

Results are printed as a markdown table and written to
``bench/results/backup-<UTC>.json`` (``--json PATH`` to choose). The machine should
be otherwise idle; one repetition per measurement (``--reps N`` for the median).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, make_url

from meshgate.data.backup import Method, backup, restore
from meshgate.data.types import UTCDateTime

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"

ENGINES = ("sqlite", "postgresql", "mariadb")
TABLE = "bench_orders"
SERVERS = {
    "postgresql": "postgresql://postgres@127.0.0.1:5432/test",
    "mariadb": "mysql://root@127.0.0.1:3306/test",
}
SYNC = {"sqlite": "sqlite", "postgresql": "postgresql+psycopg", "mariadb": "mysql+pymysql"}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


metadata = sa.MetaData()
orders = sa.Table(
    TABLE,
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
    sa.Column("customer", sa.Integer, nullable=False),
    sa.Column("email", sa.String(254), nullable=False),
    sa.Column("amount", sa.Numeric(12, 2), nullable=False),
    sa.Column("paid", sa.Boolean, nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("note", sa.Text, nullable=True),
    sa.Column("payload", sa.JSON, nullable=True),
)

FILL = {
    "postgresql": """
        INSERT INTO bench_orders (id, customer, email, amount, paid, created_at, note, payload)
        SELECT g, g % 10000, 'user' || g || '@example.com', (g % 100000) / 100.0, g % 2 = 0,
               timestamptz '2025-01-01 00:00:00+00' + g * interval '1 second' + interval '123 us',
               CASE WHEN g % 5 = 0 THEN NULL ELSE repeat('note ', 10) || g END,
               json_build_object('sku', 'SKU-' || (g % 1000), 'qty', g % 7)
        FROM generate_series(1, :rows) AS g""",
    "mariadb": """
        INSERT INTO bench_orders (id, customer, email, amount, paid, created_at, note, payload)
        SELECT seq, seq % 10000, CONCAT('user', seq, '@example.com'), (seq % 100000) / 100.0,
               seq % 2 = 0,
               TIMESTAMP '2025-01-01 00:00:00' + INTERVAL seq SECOND + INTERVAL 123 MICROSECOND,
               CASE WHEN seq % 5 = 0 THEN NULL ELSE CONCAT(REPEAT('note ', 10), seq) END,
               JSON_OBJECT('sku', CONCAT('SKU-', seq % 1000), 'qty', seq % 7)
        FROM seq_1_to_{rows}""",
    "sqlite": """
        WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < :rows)
        INSERT INTO bench_orders (id, customer, email, amount, paid, created_at, note, payload)
        SELECT n, n % 10000, 'user' || n || '@example.com', (n % 100000) / 100.0, n % 2 = 0,
               datetime(1735689600 + n, 'unixepoch') || '.000123',
               CASE WHEN n % 5 = 0 THEN NULL ELSE replace(printf('%10s', ''), ' ', 'note ') || n
               END,
               json_object('sku', 'SKU-' || (n % 1000), 'qty', n % 7)
        FROM g""",
}


@dataclass
class Result:
    engine: str
    tool: str
    operation: str
    seconds: float
    rows: int
    table_mb: float
    out_mb: float | None = None
    phases: dict[str, float] = field(default_factory=dict)
    runs: list[float] = field(default_factory=list)
    """The seconds of each repetition."""

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.table_mb / self.seconds if self.seconds else 0.0


class PhaseTimer:
    """A backup/restore progress that records the seconds of each step."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self._step = ""
        self._t0 = 0.0

    def begin(self, step: str, total: int | None) -> None:
        self._step, self._t0 = step, time.perf_counter()

    def advance(self, amount: int) -> None:
        pass

    def end(self) -> None:
        kind = self._step.split(" ", 1)[0]
        self.phases[kind] = self.phases.get(kind, 0.0) + time.perf_counter() - self._t0


# ------------------------------------------------------------------------ databases


class Databases:
    """Fresh databases of one engine, dropped when done."""

    def __init__(self, engine: str, workdir: Path, server: str | None) -> None:
        self.engine = engine
        self.workdir = workdir
        self.server = make_url(server) if server else None
        self.made: list[str] = []

    def new(self) -> URL:
        name = f"mgbench_{uuid.uuid4().hex[:10]}"
        if self.server is None:
            return URL.create("sqlite", database=str(self.workdir / f"{name}.db"))
        admin = sa.create_engine(
            self.server.set(drivername=SYNC[self.engine]), isolation_level="AUTOCOMMIT"
        )
        with admin.connect() as conn:
            conn.exec_driver_sql(f"CREATE DATABASE {name}")
        admin.dispose()
        self.made.append(name)
        return self.server.set(database=name)

    def drop_all(self) -> None:
        if self.server is None:
            return
        admin = sa.create_engine(
            self.server.set(drivername=SYNC[self.engine]), isolation_level="AUTOCOMMIT"
        )
        with admin.connect() as conn:
            for name in self.made:
                force = " WITH (FORCE)" if self.engine == "postgresql" else ""
                conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name}{force}")
        admin.dispose()


def text(url: URL) -> str:
    return url.render_as_string(hide_password=False)


def sync_engine(engine: str, url: URL) -> sa.Engine:
    return sa.create_engine(url.set(drivername=SYNC[engine]), poolclass=sa.NullPool)


def fill(engine: str, url: URL, rows: int) -> float:
    """Create and fill the table; return its size in MB."""
    db = sync_engine(engine, url)
    metadata.create_all(db)
    sql = FILL[engine].replace("{rows}", str(rows))
    with db.begin() as conn:
        conn.execute(sa.text(sql), {"rows": rows})
    size = table_mb(engine, url)
    db.dispose()
    return size


def table_mb(engine: str, url: URL) -> float:
    if engine == "sqlite":
        return Path(url.database or "").stat().st_size / 1e6
    db = sync_engine(engine, url)
    with db.connect() as conn:
        if engine == "postgresql":
            size = conn.exec_driver_sql("SELECT pg_total_relation_size('bench_orders')").scalar()
        else:
            conn.exec_driver_sql("ANALYZE TABLE bench_orders").all()
            size = conn.exec_driver_sql(
                "SELECT DATA_LENGTH + INDEX_LENGTH FROM information_schema.TABLES "
                "WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'bench_orders'"
            ).scalar()
    db.dispose()
    return float(size or 0) / 1e6


def count_rows(engine: str, url: URL) -> int:
    db = sync_engine(engine, url)
    with db.connect() as conn:
        n = conn.exec_driver_sql("SELECT COUNT(*) FROM bench_orders").scalar()
    db.dispose()
    return int(n or 0)


# ---------------------------------------------------------------------------- tools


def run(
    cmd: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    stdin: Any = None,
    stdout: Any = None,
) -> None:
    done = subprocess.run(
        list(cmd),
        env=env,
        stdin=stdin,
        stdout=stdout or subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed: {done.stderr.decode(errors='replace')[-1000:]}")


def pg_args(url: URL) -> tuple[list[str], dict[str, str]]:
    env = dict(os.environ)
    if url.password is not None:
        env["PGPASSWORD"] = str(url.password)
    args = ["-h", url.host or "127.0.0.1", "-p", str(url.port or 5432)]
    args += ["-U", url.username or "postgres", "-d", url.database or ""]
    return args, env


@contextlib.contextmanager
def my_args(url: URL) -> Iterator[list[str]]:
    """mariadb/mariadb-dump connection options, the password in an option file."""
    fd, name = tempfile.mkstemp(suffix=".cnf")
    with os.fdopen(fd, "w") as out:
        out.write("[client]\n")
        if url.password is not None:
            out.write(f'password="{url.password}"\n')
    try:
        yield [
            f"--defaults-extra-file={name}",
            "--protocol=TCP",
            f"--host={url.host or '127.0.0.1'}",
            f"--port={url.port or 3306}",
            f"--user={url.username or 'root'}",
        ]
    finally:
        os.unlink(name)


Action = tuple[str, str, Callable[[], Path | None]]
"""(tool, operation, action); the action returns the file it wrote, or None."""


def native_actions(engine: str, dbs: Databases, source: URL, work: Path) -> list[Action]:
    """The engine's own tool on the same data."""
    if engine == "postgresql" and shutil.which("pg_dump"):
        return _pg_actions(dbs, source, work / "pg.dump")
    if engine == "mariadb" and shutil.which("mariadb-dump"):
        return _my_actions(dbs, source, work / "my.sql")
    if engine == "sqlite" and shutil.which("sqlite3"):
        return _sqlite_actions(dbs, source, work)
    return []


def _pg_actions(dbs: Databases, source: URL, dump: Path) -> list[Action]:
    def pg_dump() -> Path:
        args, env = pg_args(source)
        run(["pg_dump", "-Fc", "-f", str(dump), *args], env=env)
        return dump

    def pg_restore() -> None:
        args, env = pg_args(dbs.new())
        run(["pg_restore", "--no-owner", *args, str(dump)], env=env)

    return [("pg_dump -Fc", "backup", pg_dump), ("pg_restore", "restore", pg_restore)]


def _my_actions(dbs: Databases, source: URL, dump: Path) -> list[Action]:
    def my_dump() -> Path:
        with my_args(source) as args, dump.open("wb") as f:
            opts = ["--single-transaction", "--hex-blob", source.database or ""]
            run(["mariadb-dump", *args, *opts], stdout=f)
        return dump

    def my_load() -> None:
        target = dbs.new()
        with my_args(target) as args, dump.open("rb") as f:
            run(["mariadb", *args, target.database or ""], stdin=f)

    return [("mariadb-dump", "backup", my_dump), ("mariadb < dump", "restore", my_load)]


def _sqlite_actions(dbs: Databases, source: URL, work: Path) -> list[Action]:
    copy, dump = work / "copy.db", work / "dump.sql"

    def backup_cmd() -> Path:
        copy.unlink(missing_ok=True)
        run(["sqlite3", source.database or "", f".backup '{copy}'"])
        return copy

    def copy_back() -> None:
        shutil.copyfile(copy, dbs.new().database or "")

    def dump_cmd() -> Path:
        with dump.open("wb") as f:
            run(["sqlite3", source.database or "", ".dump"], stdout=f)
        return dump

    def load_dump() -> None:
        with dump.open("rb") as f:
            run(["sqlite3", dbs.new().database or ""], stdin=f)

    return [
        ("sqlite3 .backup", "backup", backup_cmd),
        ("file copy", "restore", copy_back),
        ("sqlite3 .dump", "backup", dump_cmd),
        ("sqlite3 < dump", "restore", load_dump),
    ]


# ---------------------------------------------------------------------------- bench


def timed(reps: int, action: Callable[[], Any]) -> tuple[float, list[float], Any]:
    runs, value = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        value = action()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs), runs, value


@dataclass
class EngineBench:
    """The measurements of one engine, on one table filled once."""

    engine: str
    rows: int
    reps: int
    level: int
    dbs: Databases
    work: Path
    size: float = 0.0
    results: list[Result] = field(default_factory=list)

    def add(
        self,
        tool: str,
        op: str,
        timing: tuple[float, list[float], Any],
        phases: dict[str, float] | None = None,
    ) -> None:
        secs, runs, out = timing
        out_mb = out.stat().st_size / 1e6 if isinstance(out, Path) and out.exists() else None
        result = Result(self.engine, tool, op, secs, self.rows, self.size, out_mb, phases or {})
        result.runs = runs
        self.results.append(result)
        log(f"{self.engine}: {tool} {op}: {secs:.2f} s ({self.rows / secs:,.0f} rows/s)")

    def meshgate(self, source: URL, method: Method) -> None:
        archive = self.work / f"{method}.mgbak"

        def do_backup() -> Path:
            backup(text(source), archive, service="bench", method=method, compresslevel=self.level)
            return archive

        self.add(f"meshgate {method}", "backup", timed(self.reps, do_backup))
        timer = PhaseTimer()
        targets: list[URL] = []

        def do_restore() -> None:
            targets.append(self.dbs.new())
            timer.phases.clear()
            restore(text(targets[-1]), archive, service="bench", progress=timer)

        timing = timed(self.reps, do_restore)
        restored = count_rows(self.engine, targets[-1])
        if restored != self.rows:
            raise RuntimeError(f"the restore holds {restored} rows, not {self.rows}")
        self.add(f"meshgate {method}", "restore", timing, dict(timer.phases))

    def run(self, server: str | None) -> list[Result]:
        source = self.dbs.new()
        log(f"{self.engine}: filling {self.rows} rows ...")
        t0 = time.perf_counter()
        self.size = fill(self.engine, source, self.rows)
        log(f"{self.engine}: {self.size:.1f} MB in {time.perf_counter() - t0:.1f} s")
        self.meshgate(source, "logical")
        tool = {"sqlite": "sqlite3", "postgresql": "pg_dump", "mariadb": "mariadb-dump"}
        if self.engine == "sqlite" or shutil.which(tool[self.engine]):
            self.meshgate(source, "native")
        for name, op, action in native_actions(self.engine, self.dbs, source, self.work):
            self.add(name, op, timed(self.reps, action))
        return self.results


def bench_engine(engine: str, rows: int, reps: int, level: int, server: str | None) -> list[Result]:
    with tempfile.TemporaryDirectory(prefix="mgbench-") as tmp:
        dbs = Databases(engine, Path(tmp), server)
        try:
            return EngineBench(engine, rows, reps, level, dbs, Path(tmp)).run(server)
        finally:
            dbs.drop_all()


def table(results: Sequence[Result]) -> str:
    lines = [
        "| engine | tool | operation | seconds | rows/s | MB/s | out MB | phases (s) |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for r in results:
        phases = ", ".join(f"{k} {v:.2f}" for k, v in r.phases.items())
        out = f"{r.out_mb:.1f}" if r.out_mb is not None else ""
        lines.append(
            f"| {r.engine} | {r.tool} | {r.operation} | {r.seconds:.2f} | {r.rows_per_s:,.0f} "
            f"| {r.mb_per_s:.1f} | {out} | {phases} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows in the table")
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated")
    parser.add_argument("--reps", type=int, default=1, help="repetitions (median shown)")
    parser.add_argument("--compress-level", type=int, default=6, help="deflate level 0-9")
    parser.add_argument("--postgres-url", default=SERVERS["postgresql"])
    parser.add_argument("--mariadb-url", default=SERVERS["mariadb"])
    parser.add_argument("--json", dest="json_path", type=Path, default=None)
    opts = parser.parse_args(argv)
    engines = [e.strip() for e in opts.engines.split(",") if e.strip()]
    unknown = sorted(set(engines) - set(ENGINES))
    if unknown:
        parser.error(f"unknown engines {', '.join(unknown)}; choose from {', '.join(ENGINES)}")
    started = dt.datetime.now(dt.UTC)
    servers = {"sqlite": None, "postgresql": opts.postgres_url, "mariadb": opts.mariadb_url}
    results: list[Result] = []
    for engine in engines:
        results += bench_engine(engine, opts.rows, opts.reps, opts.compress_level, servers[engine])
    print(table(results))
    path = opts.json_path or RESULTS_DIR / f"backup-{started:%Y%m%dT%H%M%SZ}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "started": started.isoformat(),
        "rows": opts.rows,
        "reps": opts.reps,
        "compress_level": opts.compress_level,
        "cpus": os.cpu_count(),
        "results": [
            asdict(r) | {"rows_per_s": r.rows_per_s, "mb_per_s": r.mb_per_s} for r in results
        ],
    }
    path.write_text(json.dumps(data, indent=2) + "\n")
    log(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
