"""The event tables' migrations, on SQLite, PostgreSQL and MariaDB: they make the
tables the code uses (same columns), with the outbox partitions, and go back."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import inspect, select

from meshgate.data import Database
from meshgate.events import migrations
from meshgate.events.schema import PARTITIONS, EventTables

pytestmark = pytest.mark.services


async def test_upgrade_makes_the_tables_the_code_uses_and_downgrade_removes_them(
    database: Database, prefix: str
) -> None:
    tables = EventTables(prefix)
    assert await asyncio.to_thread(migrations.current, database, prefix=prefix) is None
    head = await asyncio.to_thread(migrations.upgrade, database, prefix=prefix)
    assert head is not None
    try:
        assert await asyncio.to_thread(migrations.current, database, prefix=prefix) == head
        # Twice is harmless (several replicas start at once).
        assert await asyncio.to_thread(migrations.upgrade, database, prefix=prefix) == head

        def columns(conn: object) -> dict[str, set[str]]:
            inspector = inspect(conn)
            return {
                name: {c["name"] for c in inspector.get_columns(name)}
                for name in inspector.get_table_names()
                if name.startswith(prefix)
            }

        async with database.connection() as conn:
            found = await conn.run_sync(columns)
            parts = (await conn.execute(select(tables.partitions.c.part))).scalars().all()
        expected = {t.name: {c.name for c in t.columns} for t in tables.metadata.sorted_tables}
        found.pop(tables.version_table)
        assert found == expected
        assert sorted(parts) == list(range(PARTITIONS))
    finally:
        assert await asyncio.to_thread(migrations.downgrade, database, prefix=prefix) is None
    async with database.connection() as conn:
        left = await conn.run_sync(
            lambda c: [n for n in inspect(c).get_table_names() if n.startswith(prefix)]
        )
    assert left == [tables.version_table]
    async with database.connection() as conn:
        await conn.exec_driver_sql(f"DROP TABLE {tables.version_table}")


def test_a_bad_prefix_is_refused_with_the_fix() -> None:
    from meshgate.errors import ConfigError

    with pytest.raises(ConfigError, match="not a table prefix"):
        EventTables("Bad-Prefix")
