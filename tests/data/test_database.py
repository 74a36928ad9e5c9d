"""Database on SQLite, PostgreSQL and MariaDB: sessions, errors, metrics, slow-query
log; and being cut off from a real server and getting it back, through a proxy."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import Column, Integer, MetaData, String, Table, func, insert, select, text
from sqlalchemy import exc as sa_exc

from meshgate.data import (
    Database,
    DatabaseFileGoneError,
    DatabaseUnavailableError,
    StatementTimeoutError,
    UnmigratedDatabaseError,
    migrations,
)
from meshgate.data.database import statement_kind
from meshgate.errors import ConfigError
from tests.data.conftest import service_url, tcp_proxy, unique


class BoomError(Exception):
    pass


def _items() -> tuple[MetaData, Table]:
    metadata = MetaData()
    table = Table(
        unique("items"),
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("name", String(50), nullable=False),
    )
    return metadata, table


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    database = Database(db_url, name=unique("db"), registry=CollectorRegistry(), slow_query=None)
    try:
        yield database
    finally:
        await database.close()


@pytest.fixture
async def items(db: Database) -> AsyncIterator[Table]:
    metadata, table = _items()
    await db.create_all(metadata)
    try:
        yield table
    finally:
        await db.drop_all(metadata)


def _count(table: Table) -> object:
    return select(func.count()).select_from(table)


async def test_session_commits_at_the_end_of_the_block(db: Database, items: Table) -> None:
    async with db.session() as session:
        await session.execute(insert(items), [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}])
    async with db.session() as session:
        names = (await session.execute(select(items.c.name).order_by(items.c.id))).scalars()
        assert list(names) == ["a", "b"]
        await session.execute(items.update().where(items.c.id == 1).values(name="z"))
        await session.execute(items.delete().where(items.c.id == 2))
    async with db.connection() as conn:
        rows = (await conn.execute(select(items.c.id, items.c.name))).all()
    assert [tuple(row) for row in rows] == [(1, "z")]


async def test_session_rolls_back_when_the_block_raises(db: Database, items: Table) -> None:
    async def in_session() -> None:
        async with db.session() as session:
            await session.execute(insert(items).values(id=1, name="lost"))
            raise BoomError

    async def in_connection() -> None:
        async with db.connection() as conn:
            await conn.execute(insert(items).values(id=2, name="lost too"))
            raise BoomError

    with pytest.raises(BoomError):
        await in_session()
    with pytest.raises(BoomError):
        await in_connection()
    async with db.session() as session:
        assert (await session.execute(_count(items))).scalar() == 0  # type: ignore[call-overload]


async def test_an_integrity_error_is_the_drivers_and_is_counted(
    db_url: str, tmp_path: Path
) -> None:
    registry = CollectorRegistry()
    async with Database(db_url, name="integrity", registry=registry) as database:
        metadata, table = _items()
        await database.create_all(metadata)
        try:
            async with database.session() as session:
                await session.execute(insert(table).values(id=1, name="a"))
            with pytest.raises(Exception, match=r"(?i)unique|duplicate") as info:
                async with database.session() as session:
                    await session.execute(insert(table).values(id=1, name="b"))
            assert type(info.value).__name__ == "IntegrityError"
        finally:
            await database.drop_all(metadata)
    labels = {"database": "integrity", "error": "integrity"}
    assert registry.get_sample_value("meshgate_db_errors_total", labels) == 1


async def test_ping_and_check(db: Database) -> None:
    assert await db.ping() is True
    await db.check()


async def test_query_and_pool_metrics(db_url: str) -> None:
    registry = CollectorRegistry()
    metadata, table = _items()
    async with Database(db_url, name="metered", registry=registry) as database:
        await database.create_all(metadata)
        try:
            async with database.session() as session:
                await session.execute(insert(table).values(id=1, name="a"))
                await session.execute(select(table))
                await session.execute(select(table))
                stats = database.pool_stats()
                assert stats.checked_out == 1
                assert (
                    registry.get_sample_value(
                        "meshgate_db_pool_checked_out", {"database": "metered"}
                    )
                    == 1
                )
            assert database.pool_stats().checked_out == 0
            assert (
                registry.get_sample_value("meshgate_db_pool_checked_out", {"database": "metered"})
                == 0
            )
            size = registry.get_sample_value("meshgate_db_pool_size", {"database": "metered"})
            assert size == (1 if db_url.startswith("sqlite") else 10)
            assert (
                registry.get_sample_value("meshgate_db_pool_idle", {"database": "metered"}) or 0
            ) >= 1
        finally:
            await database.drop_all(metadata)

    def count(kind: str) -> float:
        labels = {"database": "metered", "kind": kind}
        value = registry.get_sample_value("meshgate_db_query_duration_seconds_count", labels)
        return value or 0.0

    assert count("select") >= 2
    assert count("insert") == 1
    # Closed databases leave the pool gauges.
    assert registry.get_sample_value("meshgate_db_pool_size", {"database": "metered"}) is None


async def test_slow_queries_are_logged_without_their_parameters(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    registry = CollectorRegistry()
    secret = "hunter2-" + unique()
    caplog.set_level(logging.WARNING, logger="meshgate.data")
    async with (
        Database(db_url, name="slow", registry=registry, slow_query=3600.0) as fast,
        fast.session() as session,
    ):
        await session.execute(select(text(":secret")), {"secret": secret})
    assert not [r for r in caplog.records if "slow query" in r.getMessage()]

    async with (
        Database(db_url, name="slow", registry=registry, slow_query=0.0) as database,
        database.session() as session,
    ):
        value = (await session.execute(select(text(":secret")), {"secret": secret})).scalar()
    assert value == secret
    slow = [r for r in caplog.records if "slow query" in r.getMessage()]
    assert slow, caplog.text
    assert all(secret not in r.getMessage() for r in caplog.records)
    assert secret not in caplog.text
    assert any("SELECT" in r.getMessage() for r in slow)
    assert slow[0].database == "slow"  # type: ignore[attr-defined]
    assert (
        registry.get_sample_value(
            "meshgate_db_slow_queries_total", {"database": "slow", "kind": "select"}
        )
        or 0
    ) >= 1


@pytest.mark.services
@pytest.mark.parametrize(
    ("engine", "sleep"),
    [("postgresql", "SELECT pg_sleep(0.3)"), ("mariadb", "SELECT SLEEP(0.3)")],
)
async def test_a_real_slow_query_crosses_the_threshold(
    engine: str, sleep: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="meshgate.data")
    registry = CollectorRegistry()
    async with (
        Database(service_url(engine), registry=registry, slow_query=0.2) as database,
        database.connection() as conn,
    ):
        await conn.execute(text("SELECT 1"))
        await conn.execute(text(sleep))
    slow = [r for r in caplog.records if "slow query" in r.getMessage()]
    assert len(slow) == 1, caplog.text
    assert "SLEEP" in slow[0].getMessage().upper()
    assert slow[0].duration >= 0.2  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "engine",
    [
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgresql", marks=pytest.mark.services),
        pytest.param("mariadb", marks=pytest.mark.services),
    ],
)
async def test_statement_timeout(engine: str, tmp_path: Path) -> None:
    if engine == "sqlite":
        url = f"sqlite:///{tmp_path / 'slow.db'}"
        # A query that counts for a long time: interrupted by the timer.
        slow = (
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n "
            "WHERE i < 1000000000) SELECT count(*) FROM n"
        )
    elif engine == "postgresql":
        url, slow = service_url(engine), "SELECT pg_sleep(5)"
    else:
        url = service_url(engine)
        slow = (
            "SELECT count(*) FROM information_schema.columns a, information_schema.columns b, "
            "information_schema.columns c"
        )
    registry = CollectorRegistry()
    async with Database(url, name="st", statement_timeout=0.2, registry=registry) as database:
        with pytest.raises(StatementTimeoutError, match=r"statement_timeout 0\.2 s"):
            async with database.connection() as conn:
                await conn.execute(text(slow))
        # The connection is still good for the next statement.
        async with database.connection() as conn:
            assert (await conn.execute(text("SELECT 1"))).scalar() == 1
    assert (
        registry.get_sample_value(
            "meshgate_db_errors_total", {"database": "st", "error": "timeout"}
        )
        == 1
    )


async def test_a_full_pool_is_unavailable_after_pool_timeout(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'pool.db'}"
    async with (
        Database(url, pool_timeout=0.2, registry=CollectorRegistry()) as database,
        database.session() as holder,
    ):
        await holder.execute(text("SELECT 1"))
        with pytest.raises(DatabaseUnavailableError, match="no pooled connection") as info:
            async with database.session() as session:
                await session.execute(text("SELECT 1"))
        assert "pool_size" in str(info.value)


async def test_sqlite_connection_settings(tmp_path: Path) -> None:
    async with (
        Database(f"sqlite:///{tmp_path / 's.db'}", registry=CollectorRegistry()) as db,
        db.connection() as conn,
    ):
        assert (await conn.exec_driver_sql("PRAGMA journal_mode")).scalar() == "wal"
        assert (await conn.exec_driver_sql("PRAGMA foreign_keys")).scalar() == 1
        assert (await conn.exec_driver_sql("PRAGMA busy_timeout")).scalar() == 5000
    async with Database("sqlite://", registry=CollectorRegistry()) as memory:
        assert await memory.ping()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("nonsense", "not a database URL"),
        ("oracle://h/db", "unsupported database 'oracle'"),
        ("postgresql+psycopg2://h/db", "not an asyncio driver"),
        ("sqlite:////no/such/dir/x.db", "does not exist"),
    ],
)
def test_bad_urls_are_config_errors(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Database(url, registry=CollectorRegistry())


def test_bad_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="pool_size: got 0") as info:
        Database("sqlite://", pool_size=0, pool_timeout=-1, registry=CollectorRegistry())
    assert "pool_timeout" in str(info.value)


@pytest.mark.parametrize(
    ("sql", "kind"),
    [
        ("SELECT 1", "select"),
        ("  /* hint */ (select 1)", "select"),
        ("WITH x AS (SELECT 1) UPDATE t SET a = 1", "update"),
        ("REPLACE INTO t VALUES (1)", "insert"),
        ("CREATE TABLE t (a int)", "other"),
        ("", "other"),
    ],
)
def test_statement_kind(sql: str, kind: str) -> None:
    assert statement_kind(sql) == kind


# -- unavailable and back


async def test_a_database_that_is_not_there_is_unavailable(closed_port: int) -> None:
    for url in (
        f"postgresql://postgres:s3cret-pw@127.0.0.1:{closed_port}/test",
        f"mysql://root:s3cret-pw@127.0.0.1:{closed_port}/test",
    ):
        async with Database(url, name="gone", registry=CollectorRegistry()) as database:
            assert await database.ping() is False
            with pytest.raises(DatabaseUnavailableError) as info:
                async with database.session() as session:
                    await session.execute(text("SELECT 1"))
            message = str(info.value)
            assert f"127.0.0.1:{closed_port}" in message
            assert "s3cret-pw" not in message
            assert "s3cret-pw" not in repr(database)
            assert info.value.status == 503


async def test_lost_and_recovered_through_a_cut_proxy(server_url: str) -> None:
    target = urlsplit(server_url)
    assert target.port is not None
    async with tcp_proxy(target.port) as proxy:
        scheme, user = target.scheme, target.username
        # PostgreSQL trusts loopback and ignores the password; it must not leak anyway.
        password = ":s3cret-pw" if scheme == "postgresql" else ""
        url = f"{scheme}://{user}{password}@127.0.0.1:{proxy.port}{target.path}"
        registry = CollectorRegistry()
        async with Database(url, name="flaky", registry=registry, connect_timeout=2) as database:
            async with database.session() as session:
                assert (await session.execute(text("SELECT 1"))).scalar() == 1

            # Lost mid-request: the session's own connection goes away.
            async def cut_mid_session() -> None:
                async with database.session() as session:
                    await session.execute(text("SELECT 1"))
                    proxy.cut()
                    await session.execute(text("SELECT 2"))

            with pytest.raises(DatabaseUnavailableError) as info:
                await cut_mid_session()
            assert f"127.0.0.1:{proxy.port}" in str(info.value)
            assert "s3cret-pw" not in str(info.value)

            # While it is down: new sessions fail fast, readiness says no.
            with pytest.raises(DatabaseUnavailableError):
                async with database.session() as session:
                    await session.execute(text("SELECT 1"))
            assert await database.ping() is False

            # Back: the next sessions reconnect by themselves (stale connections were
            # dropped by the pre-ping or invalidated on the error).
            proxy.restore()
            for _ in range(3):
                async with database.session() as session:
                    assert (await session.execute(text("SELECT 1"))).scalar() == 1
            assert await database.ping() is True
        unavailable = registry.get_sample_value(
            "meshgate_db_errors_total", {"database": "flaky", "error": "unavailable"}
        )
        assert (unavailable or 0) >= 2


async def test_pooled_connections_dropped_while_idle_are_replaced(server_url: str) -> None:
    target = urlsplit(server_url)
    assert target.port is not None
    async with tcp_proxy(target.port) as proxy:
        url = f"{target.scheme}://{target.username}@127.0.0.1:{proxy.port}{target.path}"
        async with Database(url, registry=CollectorRegistry()) as database:
            async with database.session() as session:
                await session.execute(text("SELECT 1"))
            assert database.pool_stats().idle == 1
            # Dropped while idle in the pool (a restart, a proxy's idle limit), then back
            # at once: the pre-ping sees it and the request never does.
            proxy.cut()
            proxy.restore()
            await asyncio.sleep(0.05)
            async with database.session() as session:
                assert (await session.execute(text("SELECT 1"))).scalar() == 1


# -- the database the service expects: its SQLite file, its schema revision


def _revisions(folder: Path) -> tuple[str, str]:
    """A migrations folder with two (empty) revisions; their ids, oldest first."""
    migrations.init(folder)
    first = migrations.revision("first", folder).revision
    second = migrations.revision("second", folder).revision
    return first, second


async def test_a_deleted_sqlite_file_fails_check_and_sessions(tmp_path: Path) -> None:
    """Deleting the data folder under a running service (issue 11): its open
    connection still writes into the deleted file, so the loss must be named."""
    path = tmp_path / "data" / "users.db"
    path.parent.mkdir()
    metadata, table = _items()
    async with Database(f"sqlite:///{path}", registry=CollectorRegistry()) as db:
        await db.create_all(metadata)
        assert await db.check() == {}
        for leftover in path.parent.iterdir():
            leftover.unlink()  # rm -rf .meshgate/data
        with pytest.raises(DatabaseFileGoneError, match="was deleted") as caught:
            await db.check()
        assert str(path) in str(caught.value)
        assert "restart the service" in str(caught.value)
        assert isinstance(caught.value, DatabaseUnavailableError)  # a 503
        with pytest.raises(DatabaseFileGoneError):
            async with db.session() as session:
                await session.execute(insert(table).values(id=1, name="lost"))
        with pytest.raises(DatabaseFileGoneError):
            async with db.connection():
                pass
        assert not await db.ping()


async def test_a_replaced_sqlite_file_fails_check(tmp_path: Path) -> None:
    path = tmp_path / "users.db"
    async with Database(f"sqlite:///{path}", registry=CollectorRegistry()) as db:
        await db.check()
        path.unlink()
        path.write_bytes(b"")  # another file at the same path
        with pytest.raises(DatabaseFileGoneError, match="was replaced by another file"):
            await db.check()


async def test_check_requires_the_head_of_the_migrations(db_url: str, tmp_path: Path) -> None:
    folder = tmp_path / "migrations"
    first, second = _revisions(folder)
    version_table = unique("version")
    db = Database(
        db_url,
        registry=CollectorRegistry(),
        migrations=folder,
        version_table=version_table,
    )
    try:
        with pytest.raises(UnmigratedDatabaseError, match="has no schema revision") as caught:
            await db.check()
        assert f"no {version_table} table" in str(caught.value)
        assert second in str(caught.value)
        assert "meshgate db upgrade" in str(caught.value)
        assert caught.value.status == 503

        migrations.upgrade(db_url, folder, first, version_table=version_table)
        with pytest.raises(UnmigratedDatabaseError, match=f"is at revision {first}, behind"):
            await db.check()

        migrations.upgrade(db_url, folder, version_table=version_table)
        assert await db.check() == {"revision": second}

        async with db.connection() as conn:
            await conn.execute(text(f"UPDATE {version_table} SET version_num = 'f00dcafe'"))  # noqa: S608
        with pytest.raises(UnmigratedDatabaseError, match="ahead of this code"):
            await db.check()
    finally:
        async with db.connection() as conn:
            await conn.execute(text(f"DROP TABLE IF EXISTS {version_table}"))
        await db.close()


async def test_a_missing_table_is_named_when_the_migrations_are_known(
    db_url: str, tmp_path: Path
) -> None:
    folder = tmp_path / "migrations"
    _revisions(folder)
    missing = unique("missing")
    registry = CollectorRegistry()
    async with Database(db_url, registry=registry, migrations=folder, name="known") as db:
        with pytest.raises(UnmigratedDatabaseError, match="not at the schema of the migrations"):
            async with db.session() as session:
                await session.execute(text(f"SELECT id FROM {missing}"))  # noqa: S608
    labels = {"database": "known", "error": "schema"}
    assert registry.get_sample_value("meshgate_db_errors_total", labels) == 1
    # Without migrations to compare with, it is the statement's own error.
    async with Database(db_url, registry=CollectorRegistry()) as db:
        with pytest.raises(sa_exc.DBAPIError):
            async with db.session() as session:
                await session.execute(text(f"SELECT id FROM {missing}"))  # noqa: S608
