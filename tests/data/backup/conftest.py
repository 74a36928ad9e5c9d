"""Fixtures of the backup tests: a fresh, empty database per engine (a file for
SQLite; CREATE DATABASE on PostgreSQL and MariaDB, dropped afterwards), the writers
that move money while a backup runs, and hand-written migrations."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from textwrap import dedent, indent

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from meshgate.data import migrations
from tests.data.conftest import service_url, unique

NewDatabase = Callable[[str], str]
"""engine name -> the URL of a new, empty database of that engine."""

ENGINES = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgresql", id="postgresql", marks=pytest.mark.services),
    pytest.param("mariadb", id="mariadb", marks=pytest.mark.services),
]


def sync_url(url: str) -> str:
    """The URL with the synchronous driver, for the tests' own connections."""
    parsed = make_url(url)
    scheme = parsed.drivername.partition("+")[0]
    driver = {"sqlite": "sqlite", "postgresql": "postgresql+psycopg", "mysql": "mysql+pymysql"}
    return parsed.set(drivername=driver[scheme]).render_as_string(hide_password=False)


def sync_engine(url: str) -> sa.Engine:
    engine = sa.create_engine(sync_url(url), poolclass=sa.NullPool)
    if engine.dialect.name == "sqlite":

        @sa.event.listens_for(engine, "connect")
        def _wal(dbapi_connection: object, _record: object) -> None:
            cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA busy_timeout = 5000")
            cursor.close()

    return engine


@pytest.fixture
def new_database(tmp_path: Path) -> Iterator[NewDatabase]:
    made: list[tuple[str, str]] = []

    def make(engine: str) -> str:
        name = unique("mgbak")
        if engine == "sqlite":
            return f"sqlite:///{tmp_path / name}.db"
        base = service_url(engine)
        admin = sa.create_engine(
            sync_url(base), poolclass=sa.NullPool, isolation_level="AUTOCOMMIT"
        )
        with admin.connect() as conn:
            conn.exec_driver_sql(f"CREATE DATABASE {name}")
        admin.dispose()
        made.append((base, name))
        return make_url(base).set(database=name).render_as_string(hide_password=False)

    yield make
    for base, name in made:
        admin = sa.create_engine(
            sync_url(base), poolclass=sa.NullPool, isolation_level="AUTOCOMMIT"
        )
        with admin.connect() as conn:
            force = " WITH (FORCE)" if admin.dialect.name == "postgresql" else ""
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name}{force}")
        admin.dispose()


# -- two tables whose sum is constant, and writers that move value between them

ACCOUNTS = 1500
START = 100
TOTAL = 2 * ACCOUNTS * START

bank = sa.MetaData()
checking = sa.Table(
    "checking",
    bank,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("owner", sa.String(50), nullable=False),
    sa.Column("balance", sa.Integer, nullable=False),
)
savings = sa.Table(
    "savings",
    bank,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("owner", sa.String(50), nullable=False),
    sa.Column("balance", sa.Integer, nullable=False),
)


def make_bank(url: str) -> None:
    engine = sync_engine(url)
    bank.create_all(engine)
    rows = [{"id": i, "owner": f"owner {i}", "balance": START} for i in range(1, ACCOUNTS + 1)]
    with engine.begin() as conn:
        conn.execute(checking.insert(), rows)
        conn.execute(savings.insert(), rows)
    engine.dispose()


def bank_total(url: str) -> tuple[int, int, int]:
    """(sum of both tables, rows of checking, rows of savings)."""
    engine = sync_engine(url)
    with engine.connect() as conn:
        total = sum(
            conn.execute(sa.select(sa.func.coalesce(sa.func.sum(t.c.balance), 0))).scalar_one()
            for t in (checking, savings)
        )
        counts = [
            conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one()
            for t in (checking, savings)
        ]
    engine.dispose()
    return int(total), counts[0], counts[1]


class Writers:
    """Threads that move random amounts from a checking account to a savings
    account (and back), one transaction per transfer, until stopped."""

    def __init__(self, url: str, threads: int = 2) -> None:
        self.engine = sync_engine(url)
        self.transfers = 0
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def __enter__(self) -> Writers:
        for thread in self._threads:
            thread.start()
        self.wait_for(5)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)
        self.engine.dispose()

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        try:
            with self.engine.connect() as conn:
                while not self._stop.is_set():
                    a, b = rng.randint(1, ACCOUNTS), rng.randint(1, ACCOUNTS)
                    amount = rng.randint(1, 10)
                    src, dst = (checking, savings) if rng.random() < 0.5 else (savings, checking)
                    try:
                        with conn.begin():
                            conn.execute(
                                src.update()
                                .where(src.c.id == a)
                                .values(balance=src.c.balance - amount)
                            )
                            conn.execute(
                                dst.update()
                                .where(dst.c.id == b)
                                .values(balance=dst.c.balance + amount)
                            )
                    except sa.exc.OperationalError:
                        continue  # a deadlock or busy database: the transfer did not happen
                    with self._lock:
                        self.transfers += 1
        except BaseException as exc:
            self.errors.append(exc)

    def wait_for(self, more: int, timeout: float = 10.0) -> None:
        """Block until ``more`` transfers have committed since the call."""
        target = self.transfers + more
        deadline = time.monotonic() + timeout
        while self.transfers < target:
            if self.errors:
                raise self.errors[0]
            if time.monotonic() > deadline:
                raise AssertionError(f"writers made {self.transfers} transfers, not {target}")
            time.sleep(0.002)


class InterleavingProgress:
    """A backup's progress that, when each table starts, waits until the writers have
    committed more transfers: the dump and the writes interleave for sure."""

    def __init__(self, writers: Writers, per_step: int = 25) -> None:
        self.writers = writers
        self.per_step = per_step
        self.steps: list[str] = []
        self.during = 0

    def begin(self, step: str, total: int | None) -> None:
        self.steps.append(step)
        before = self.writers.transfers
        self.writers.wait_for(self.per_step)
        self.during += self.writers.transfers - before

    def advance(self, amount: int) -> None:
        pass

    def end(self) -> None:
        pass


# -- migrations written by hand, with fixed revision ids


def write_migrations(folder: Path, revisions: list[tuple[str, str | None, str]]) -> Path:
    """A migrations folder with ``revisions``: (id, down id, body of upgrade())."""
    migrations.init(folder)
    for rev, down, body in revisions:
        lines = [
            f'"""revision {rev}"""',
            "import sqlalchemy as sa",
            "from alembic import op",
            "from meshgate.data.types import UTCDateTime",
            f"revision = {rev!r}",
            f"down_revision = {down!r}",
            "branch_labels = None",
            "depends_on = None",
            "def upgrade() -> None:",
            indent(dedent(body).strip(), "    "),
            "def downgrade() -> None:",
            "    pass",
        ]
        (folder / "versions" / f"{rev}.py").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder
